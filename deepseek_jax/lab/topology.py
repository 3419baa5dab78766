"""`python -m deepseek_jax.lab topology`: network cost per endpoint against scale for FT2, MPFT,
FT3, Slim Fly and Dragonfly ("Insights" §5.1, Table 3).

Each topology is built by formula (`codesign.topology`) from switches of one radix: at each scale
the smallest build that connects that many endpoints (fat-trees pruned to the leaves needed, Slim
Fly the smallest q, Dragonfly the fewest groups), priced with the per-port and per-link prices
that Table 3's FT2 and FT3 rows imply. Cost per endpoint = that build's cost / the endpoints asked
for. A second table moves the switch radix: how far each topology reaches and at what cost.
"""

from __future__ import annotations

import numpy as np

from deepseek_jax import errors
from deepseek_jax.cli_args import ArgParser, int_list, output_dir, positive_int
from deepseek_jax.codesign import plots, topology
from deepseek_jax.config import ConfigError
from deepseek_jax.lab import study_main

NAMES = ("FT2", "MPFT", "FT3", "SF", "DF")


def cost_per_endpoint(name: str, radix: int, endpoints: int, planes: int) -> float | None:
  """$ per endpoint of the smallest build of `name` for `endpoints`; None where it cannot reach."""
  port, link = topology.prices_from_paper()
  try:
    t = topology.build(name, radix, endpoints, planes)
  except ConfigError:
    return None
  return t.cost_per_endpoint(port, link)


def scale_rows(scales, radix: int, planes: int) -> list[tuple[int, dict[str, float | None]]]:
  return [(n, {name: cost_per_endpoint(name, radix, n, planes) for name in NAMES})
          for n in scales]


def radix_rows(radixes, planes: int) -> list[list[str]]:
  """Each topology at full size for each radix: endpoints and k$ per endpoint."""
  port, link = topology.prices_from_paper()
  out = []
  for k in radixes:
    row = [str(k)]
    for name in NAMES:
      try:
        t = topology.build(name, k, None, planes)
      except ConfigError:
        row.append("-")
        continue
      row.append(f"{t.endpoints:,} @ {t.cost_per_endpoint(port, link) / 1e3:.2f}")
    out.append(row)
  return out


def cheapest_ranges(radix: int, planes: int, scales) -> list[tuple[str, int, int, float]]:
  """(topology, first scale, last scale, max k$ per endpoint) where it is the cheapest, in order."""
  out: list[list] = []
  for n, costs in scale_rows(scales, radix, planes):
    options = [(round(c), NAMES.index(name), name, c) for name, c in costs.items()
               if c is not None]
    if not options:
      continue
    _, _, name, c = min(options)     # ties (to the dollar) go to the simpler topology
    if out and out[-1][0] == name:
      out[-1][2], out[-1][3] = n, max(out[-1][3], c)
    else:
      out.append([name, n, n, c])
  return [(a, b, c, d / 1e3) for a, b, c, d in out]


def _table(header, rows) -> list[str]:
  widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
  return ["  " + "  ".join(f"{str(x):>{w}s}" for x, w in zip(r, widths)) for r in [header, *rows]]


def summary(radix: int, planes: int) -> list[str]:
  port, link = topology.prices_from_paper()
  fine = sorted({int(x) for x in np.geomspace(512, 300_000, 400)} | {2048, 16384, 32928, 65536})
  ranges = cheapest_ranges(radix, planes, fine)
  full = {name: topology.build(name, radix, None, planes) for name in NAMES}
  per = {name: t.cost_per_endpoint(port, link) / 1e3 for name, t in full.items()}
  cap = {name: t.endpoints for name, t in full.items()}
  return [
      "What it shows (prices from Table 3's FT2 and FT3 rows; estimates):",
      "- Cheapest by scale: " + "; ".join(
          f"{name} {lo:,}-{hi:,}" for name, lo, hi, _ in ranges) + " endpoints.",
      f"- A fat-tree costs the same per endpoint wherever its leaf switches are full: FT2 "
      f"{per['FT2']:.2f} k$ up to {cap['FT2']:,}, FT3 {per['FT3']:.2f} k$ up to {cap['FT3']:,} "
      f"(+{100 * (per['FT3'] / per['FT2'] - 1):.0f}%: 5 switch ports and 2 links per endpoint "
      "against 3 and 1).",
      f"- MPFT keeps FT2's {per['MPFT']:.2f} k$ to {cap['MPFT']:,} endpoints ({planes} planes, one "
      "NIC per GPU in each): the two-layer price at 8x the two-layer limit. Beyond it, Slim Fly "
      f"(~{per['SF']:.2f} k$ to {cap['SF']:,}) and Dragonfly (~{per['DF']:.2f} k$ to "
      f"{cap['DF']:,}) undercut FT3; Slim Fly is dear when small (whole {radix}-port switches, few "
      "ports used).",
  ]


def build_parser(prog: str) -> ArgParser:
  p = ArgParser(prog=prog, description="Network cost per endpoint against scale for FT2, MPFT, FT3, "
                                     "Slim Fly and Dragonfly (Insights Table 3 prices).")
  p.add_argument("--radix", type=positive_int, default=64, help="switch ports (64, the paper's)")
  p.add_argument("--planes", type=positive_int, default=8, help="MPFT planes (8: one per GPU)")
  p.add_argument("--scales", default="512,1024,2048,4096,8192,16384,32768,65536,131072,262144",
                 metavar="N,...", help="endpoint counts for the table")
  p.add_argument("--radixes", default="32,64,128", metavar="K,...",
                 help="switch radixes for the reach table (32,64,128)")
  p.add_argument("--plot", metavar="DIR", help="write topology_cost.png into DIR")
  return p


def run(argv, prog: str) -> list[str]:
  args = build_parser(prog).parse_args(argv)
  scales = int_list("--scales", args.scales)
  radixes = int_list("--radixes", args.radixes)
  for k in [args.radix, *radixes]:
    if k < 8 or k % 2:
      raise ConfigError(f"radix {k}: must be an even integer >= 8 (the smallest Slim Fly)")
  plot_dir = output_dir("--plot", args.plot)
  port, link = topology.prices_from_paper()
  lines = [f"# network cost per endpoint (k$) against scale, {args.radix}-port switches, "
           f"{port:,.0f} $/port + {link:,.0f} $/link (Table 3's prices); '-': out of reach",
           "== Cost per endpoint by scale =="]
  rows = [[f"{n:,}"] + [("-" if c is None else f"{c / 1e3:.2f}") for c in costs.values()]
          + [min(((round(c), NAMES.index(name), name) for name, c in costs.items()
                  if c is not None), default=(0, 0, "-"))[2]]
          for n, costs in scale_rows(scales, args.radix, args.planes)]
  lines += _table(["endpoints", *NAMES, "cheapest"], rows)
  lines.append("== Reach by switch radix: endpoints @ k$ per endpoint, full size ==")
  lines += _table(["radix", *NAMES], radix_rows(radixes, args.planes))
  lines += summary(args.radix, args.planes)
  if plot_dir is not None:
    ns = sorted({int(x) for x in np.geomspace(128, 300_000, 600)})
    curves = {}
    for name in NAMES:
      pts = [(n, cost_per_endpoint(name, args.radix, n, args.planes)) for n in ns]
      pts = [(n, c) for n, c in pts if c is not None]
      curves[name] = ([n for n, _ in pts], [c for _, c in pts])
    marks = []
    for t in topology.table3(args.radix, args.planes) if args.radix == 64 else []:
      paper_k = topology.PAPER_TABLE3[t.name][4]
      marks.append((f"{t.name} (paper {paper_k} k$)", t.endpoints,
                    t.cost_per_endpoint(port, link)))
    path = plots.plot_topology_study(curves, plot_dir / "topology_cost.png", args.radix, marks)
    lines.append(f"plot: {path}")
  return lines


def main(argv=None, prog: str = "python -m deepseek_jax.lab topology") -> int:
  return study_main(run, argv, prog)


if __name__ == "__main__":
  errors.leave(main())
