"""The programs the AOT report compiles: the real training step (`training.build`, what train.py
runs) and one decode step on the latent cache (absorbed MLA, what generation runs per token), each
for a target's devices, with the model's own FLOP count per device to compare against.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from deepseek_jax.config import Config
from deepseek_jax.mla import ABSORBED, absorbed_weights
from deepseek_jax.model import Transformer, init_model_cache
from deepseek_jax.training.build import build
from deepseek_jax.training.state import variables_of


@dataclasses.dataclass(frozen=True)
class Program:
  what: str
  lowered: object          # jax.stages.Lowered
  model_flops: float       # per device per step
  built: object = None     # training.build.Built of a train step (what --crosscheck reads)


def train_program(cfg: Config, devices) -> Program:
  """One optimizer step of `cfg` over `devices` (grad_accum microbatches included)."""
  b = build(cfg, devices)
  t, m = b.cfg.train, b.cfg.model
  with b.activate():
    lowered = b.step_fn.lower(b.abstract, b.batch_abstract)
  tokens = t.batch_size * t.seq_len
  flops = m.flops_per_token(t.seq_len, mtp=True) * tokens / len(devices)
  return Program(f"train step, batch {t.batch_size} x {t.seq_len} ({m.dtype} compute, "
                 f"remat {m.remat}, experts {m.dropless_impl}, attention {m.attention_impl})",
                 lowered, flops, b)


def decode_program(cfg: Config, devices, batch: int, context: int) -> Program:
  """One decode step as `generate.decode_loop` runs it: `batch` rows, one new token each, at the
  last position of a `context`-slot latent cache (donated, updated in place, read in blocks by
  `mla.latent_attention`), weights sharded as in training, W_UK / W_UV pre-laid."""
  b = build(dataclasses.replace(cfg, train=dataclasses.replace(
      cfg.train, batch_size=max(batch, 1), grad_accum=1)), devices)
  m = b.cfg.model
  variables = variables_of(b.abstract)
  # W_UK / W_UV in decode layout, as generation lays them out once per call (replicated here).
  replicated = NamedSharding(b.mesh, P())
  absorbed = jax.eval_shape(lambda v: absorbed_weights(m, v)[ABSORBED], variables)
  variables = dict(variables, **{ABSORBED: jax.tree.map(
      lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=replicated), absorbed)})
  row_axes = b.batch_sh.spec[0] if len(b.batch_sh.spec) else None
  cache_sh = NamedSharding(b.mesh, P(None, row_axes))
  cache = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=cache_sh),
                       jax.eval_shape(lambda: init_model_cache(m, batch, context)))
  tok_sh = NamedSharding(b.mesh, P(row_axes))
  tokens_B1 = jax.ShapeDtypeStruct((batch, 1), jnp.int32, sharding=tok_sh)
  model = Transformer(m, experts=b.model.experts)

  def step(variables, cache, tokens_B1, positions_B1):
    out = model.apply(variables, tokens_B1, positions_B1, cache=cache)
    return jnp.argmax(out.logits_BTV[:, 0], axis=-1), out.cache

  fn = jax.jit(step, donate_argnums=(1,))
  with b.activate():
    lowered = fn.lower(variables, cache, tokens_B1, tokens_B1)
  # weights: 2 FLOPs per active matmul parameter; absorbed attention over the context: scores
  # against C + R and the output over C, per head and layer
  matmul = m.flops_per_token(1, mtp=False, causal=False) / 3.0
  attn = 2.0 * m.num_layers * m.num_heads * context * (2 * m.kv_lora_rank + m.qk_rope_head_dim)
  return Program(f"decode step, batch {batch}, context {context} ({m.dtype})", lowered,
                 (matmul + attn) * batch / len(devices))
