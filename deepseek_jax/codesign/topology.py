"""Network topology cost ("Insights into DeepSeek-V3" §5.1, Table 3; Slim Fly's counting method).

Every topology is built from switches of one radix k and counted by formula: endpoints, switches
and switch-to-switch links (endpoint cables are not counted, as in the paper's Table 3):

  FT2   two-layer fat-tree: k^2/2 endpoints, 3k/2 switches, k^2/2 links (k=64: 2,048)
  MPFT  multi-plane fat-tree: `planes` independent FT2s, one NIC per GPU in each plane (8 x FT2)
  FT3   three-layer fat-tree: k^3/4 endpoints, 5k^2/4 switches, k^3/2 links
  SF    Slim Fly (MMS graph, q = 4w + d): 2q^2 switches of network radix k' = (3q - d)/2, each with
        p = ceil(k'/2) endpoints, q^2 k' links; the largest q with k' + p <= k
  DF    balanced Dragonfly: a = 2p = 2h routers per group, p endpoints and h global links per
        router (a - 1 + p + h <= k), g groups (at most a h + 1), g a (a - 1)/2 + g a h/2 links

Cost = switches x k x (price per port) + links x (price per link). The paper states no prices;
they follow from two of its rows: FT2 costs 3 ports + 1 link per endpoint (4.39 k$), FT3 5 ports
+ 2 links (7.5 k$), hence 1,280 $ per port (81,920 $ per 64-port switch) and 550 $ per link
(`prices_from_paper`). The other rows are then predictions.
"""

from __future__ import annotations

import dataclasses
import math

from deepseek_jax.config import ConfigError

# Insights Table 3 as printed: endpoints, switches, links, cost [M$], cost per endpoint [k$].
PAPER_TABLE3 = {
    "FT2": (2048, 96, 2048, 9, 4.39),
    "MPFT": (16384, 768, 16384, 72, 4.39),
    "FT3": (65536, 5120, 131072, 491, 7.5),
    "SF": (32928, 1568, 32928, 146, 4.4),
    "DF": (261632, 16352, 384272, 1522, 5.8),
}
PAPER_RADIX = 64       # 64-port 400G InfiniBand switches (§5.1)
PAPER_PLANES = 8       # one plane per GPU-NIC pair of an 8-GPU node
PAPER_DF_GROUPS = 511  # the paper's DF: 16,352 switches = 32 routers x 511 groups


@dataclasses.dataclass(frozen=True)
class Topology:
  name: str
  radix: int
  endpoints: int
  switches: int
  links: int
  detail: str = ""

  def cost(self, port_price: float, link_price: float) -> float:
    return self.switches * self.radix * port_price + self.links * link_price

  def cost_per_endpoint(self, port_price: float, link_price: float,
                        endpoints: int | None = None) -> float:
    """Cost over `endpoints` (default: all the network has; fewer when only part is used)."""
    return self.cost(port_price, link_price) / (self.endpoints if endpoints is None else endpoints)


def _radix(k) -> int:
  if not isinstance(k, int) or isinstance(k, bool) or k < 4 or k % 2:
    raise ConfigError(f"radix={k!r}: must be an even integer >= 4")
  return k


def _count(name: str, v, lo: int = 1) -> int:
  if not isinstance(v, int) or isinstance(v, bool) or v < lo:
    raise ConfigError(f"{name}={v!r}: must be an integer >= {lo}")
  return v


def fat_tree_2(k: int, endpoints: int | None = None, planes: int = 1) -> Topology:
  """Two-layer fat-tree (leaf/spine), `planes` copies side by side (MPFT when planes > 1).

  Full size: k leaves of k/2 endpoints and k/2 up-links, k/2 spines. With `endpoints` given, the
  smallest pruned build: ceil(n/(k/2)) leaves per plane, half as many spines (none for one leaf).
  """
  k, planes = _radix(k), _count("planes", planes)
  cap = planes * k * k // 2
  n = cap if endpoints is None else _count("endpoints", endpoints)
  if n > cap:
    raise ConfigError(f"endpoints={n}: a {planes}-plane two-layer fat-tree of radix {k} holds at "
                      f"most {cap} (planes x k^2/2)")
  per_plane = math.ceil(n / planes)
  leaves = math.ceil(per_plane / (k // 2))
  spines = 0 if leaves == 1 else math.ceil(leaves / 2)
  links = 0 if leaves == 1 else leaves * k // 2
  name = "FT2" if planes == 1 else "MPFT"
  return Topology(name, k, n, planes * (leaves + spines), planes * links,
                  f"{planes} x ({leaves} leaf + {spines} spine)" if planes > 1
                  else f"{leaves} leaf + {spines} spine")


def fat_tree_3(k: int, endpoints: int | None = None) -> Topology:
  """Three-layer fat-tree: k pods of k/2 edge + k/2 aggregation switches, (k/2)^2 core switches.

  Pruned to `endpoints`: ceil(n/(k/2)) edge switches, as many aggregation, half as many core.
  """
  k = _radix(k)
  cap = k ** 3 // 4
  n = cap if endpoints is None else _count("endpoints", endpoints)
  if n > cap:
    raise ConfigError(f"endpoints={n}: a three-layer fat-tree of radix {k} holds at most {cap} "
                      "(k^3/4)")
  edges = math.ceil(n / (k // 2))
  core = math.ceil(edges / 2)
  return Topology("FT3", k, n, 2 * edges + core, edges * k, f"{edges} edge + {edges} agg + "
                  f"{core} core")


def slim_fly_q(q: int, k: int | None = None) -> Topology:
  """Slim Fly on the MMS graph of parameter q (q = 4w + d, d in {-1, 0, 1}).

  The MMS construction needs q to be a prime power; the counts are the formula's for any such q
  (the paper's q = 28 is not a prime power). Switch radix: k if given, else k' + p.
  """
  q = _count("q", q, 3)
  if q % 4 == 2:
    raise ConfigError(f"q={q}: must be 4w + d with d in -1, 0, 1 (q mod 4 != 2)")
  d = {0: 0, 1: 1, 3: -1}[q % 4]
  net = (3 * q - d) // 2
  p = math.ceil(net / 2)
  if k is not None and _radix(k) < net + p:
    raise ConfigError(f"q={q}: needs radix {net + p} (k' = {net} + p = {p}), more than {k}")
  switches = 2 * q * q
  return Topology("SF", net + p if k is None else k, switches * p, switches, q * q * net,
                  f"q={q}, k'={net}, p={p}" + ("" if _prime_power(q) else " (q not a prime power)"))


def _prime_power(q: int) -> bool:
  for f in range(2, q + 1):
    if q % f == 0:
      while q % f == 0:
        q //= f
      return q == 1
  return False


def slim_fly_qs(k: int) -> list[int]:
  """Every q whose Slim Fly fits radix k, ascending."""
  k = _radix(k)
  out = []
  for q in range(3, k + 1):
    if q % 4 == 2:
      continue
    d = {0: 0, 1: 1, 3: -1}[q % 4]
    net = (3 * q - d) // 2
    if net + math.ceil(net / 2) <= k:
      out.append(q)
  return out


def slim_fly(k: int, endpoints: int | None = None) -> Topology:
  """The largest Slim Fly of radix k, or the smallest one with at least `endpoints`."""
  qs = slim_fly_qs(k)
  if not qs:
    raise ConfigError(f"radix={k}: too small for a Slim Fly (the smallest, q = 3, needs radix 8)")
  if endpoints is None:
    return slim_fly_q(qs[-1], k)
  n = _count("endpoints", endpoints)
  for q in qs:
    t = slim_fly_q(q, k)
    if t.endpoints >= n:
      return dataclasses.replace(t, endpoints=n)
  raise ConfigError(f"endpoints={n}: a Slim Fly of radix {k} holds at most "
                    f"{slim_fly_q(qs[-1], k).endpoints}")


def dragonfly_shape(k: int) -> tuple[int, int, int]:
  """(p, a, h) of the balanced Dragonfly (a = 2p = 2h) with the largest h such that
  a - 1 + p + h = 4h - 1 <= k."""
  h = (_radix(k) + 1) // 4
  return h, 2 * h, h


def dragonfly(k: int, groups: int | None = None, endpoints: int | None = None) -> Topology:
  """Balanced Dragonfly of radix k: `groups` groups (default a h + 1, the maximum), or the fewest
  groups with at least `endpoints`. Every global port is cabled: g a h/2 global links."""
  p, a, h = dragonfly_shape(k)
  g_max = a * h + 1
  if endpoints is not None:
    n = _count("endpoints", endpoints)
    if n > g_max * a * p:
      raise ConfigError(f"endpoints={n}: a Dragonfly of radix {k} holds at most {g_max * a * p}")
    groups = max(2, math.ceil(n / (a * p)))
  g = g_max if groups is None else _count("groups", groups, 2)
  if g > g_max:
    raise ConfigError(f"groups={g}: at most a h + 1 = {g_max} for radix {k}")
  links = g * a * (a - 1) // 2 + g * a * h // 2
  t = Topology("DF", k, g * a * p, g * a, links, f"p={p}, a={a}, h={h}, g={g}")
  return t if endpoints is None else dataclasses.replace(t, endpoints=n)


def build(name: str, k: int, endpoints: int | None = None, planes: int = PAPER_PLANES) -> Topology:
  """One of FT2, MPFT, FT3, SF, DF by name (full size, or the smallest build for `endpoints`)."""
  builders = {"FT2": lambda: fat_tree_2(k, endpoints),
              "MPFT": lambda: fat_tree_2(k, endpoints, planes),
              "FT3": lambda: fat_tree_3(k, endpoints),
              "SF": lambda: slim_fly(k, endpoints),
              "DF": lambda: dragonfly(k, endpoints=endpoints)}
  if name not in builders:
    raise ConfigError(f"topology {name!r}: unknown (one of {', '.join(builders)})")
  return builders[name]()


def prices_from_paper(k: int = PAPER_RADIX) -> tuple[float, float]:
  """(price per switch port, price per link) that give the paper's FT2 and FT3 cost per endpoint.

  Per endpoint FT2 costs 3 ports + 1 link and FT3 5 ports + 2 links (the formulas above), so two
  equations in two unknowns; solved exactly from the printed 4.39 and 7.5 k$.
  """
  ft2, ft3 = fat_tree_2(k), fat_tree_3(k)
  a = [[ft2.switches * k / ft2.endpoints, ft2.links / ft2.endpoints],
       [ft3.switches * k / ft3.endpoints, ft3.links / ft3.endpoints]]
  b = [PAPER_TABLE3["FT2"][4] * 1e3, PAPER_TABLE3["FT3"][4] * 1e3]
  det = a[0][0] * a[1][1] - a[0][1] * a[1][0]
  port = (b[0] * a[1][1] - a[0][1] * b[1]) / det
  link = (a[0][0] * b[1] - b[0] * a[1][0]) / det
  return port, link


def table3(k: int = PAPER_RADIX, planes: int = PAPER_PLANES,
           df_groups: int = PAPER_DF_GROUPS) -> list[Topology]:
  """Insights Table 3's five networks recomputed by formula."""
  return [fat_tree_2(k), fat_tree_2(k, planes=planes), fat_tree_3(k), slim_fly(k),
          dragonfly(k, groups=df_groups)]
