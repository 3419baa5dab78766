"""Manual-axis types inside `shard_map` for hand-written VJPs and scan carries.

Autodiff inserts the collectives that `shard_map`'s varying-axis typing implies; a `custom_vjp`
backward or a constant-initialised scan carry must do it by hand. Outside `shard_map` these are
no-ops.
"""

from __future__ import annotations

import jax


def varying_axes(x) -> frozenset:
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)   # jax >= 0.9; older versions call it `vma`
  return frozenset(mat.varying) if mat is not None else frozenset(getattr(aval, "vma", ()))


def cotangent_like(ct: jax.Array, primal: jax.Array) -> jax.Array:
  """A cotangent given the manual-axis type of its primal: summed over the axes the primal is
  replicated on (what autodiff's transpose of the implicit broadcast does), broadcast over the
  ones it varies on."""
  extra = tuple(sorted(varying_axes(ct) - varying_axes(primal)))
  if extra:
    ct = jax.lax.psum(ct, extra)
  return varying_like(ct, (primal,))


def varying_like(z: jax.Array, refs) -> jax.Array:
  """`z` marked as varying over every manual mesh axis any of `refs` varies over (inside a
  `shard_map`, a scan carry must have the type of what the body makes of it)."""
  axes = frozenset().union(*(varying_axes(r) for r in refs))
  missing = tuple(sorted(axes - varying_axes(z)))
  return jax.lax.pcast(z, missing, to="varying") if missing else z
