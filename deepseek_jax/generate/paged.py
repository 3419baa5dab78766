"""A paged latent cache (V3 report §2.1.1; the block tables of vLLM's PagedAttention).

The cache of every layer is a pool of fixed-size blocks, each holding `P` tokens' [c_KV ; k_R]
(C + R values per token and layer, as the contiguous cache: (C + R)·L per token in all). A
sequence owns a list of blocks, its row of the block table; block 0 is a scratch block that no
sequence owns (unassigned table entries point at it, so writes past a row's blocks land there and
its reads are masked). Attention is the contiguous cache's kernel (`mla.online_latent_attention`)
reading a row's blocks in groups of `G` through the table, over the groups in use (the longest
row's), never the whole pool nor a [B, max length] copy. `BlockPool` is the host-side allocator: blocks on demand, freed at finish.
"""

from __future__ import annotations

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from deepseek_jax.config import ModelConfig
from deepseek_jax.kernels import cpu as cpu_kernels
from deepseek_jax.layers import dtype_of
from deepseek_jax.mla import online_latent_attention, to_cache_dtype

SCRATCH = 0          # the block no sequence owns


@flax.struct.dataclass
class PagedLatentCache:
  """Pools [L, NB, P, C] and [L, NB, P, R] (no L axis for a single layer, the MTP drafter's) and
  the block table [B, MB]: row b's token at position p lives in block table[b, p // P], slot
  p % P. `group` blocks are read per step of the online softmax. The MLA hook
  (`MLA._self_reading`) calls `write_and_attend`."""
  latent_pool: jax.Array
  rope_pool: jax.Array
  table_BM: jax.Array
  group: int = flax.struct.field(pytree_node=False, default=8)

  @property
  def dtype(self):
    return self.latent_pool.dtype

  @property
  def block_size(self) -> int:
    return self.latent_pool.shape[-2]

  def write_and_attend(self, latent_BTC, rope_BTR, q_lat_BTNC, q_rope_BTNR, positions_BT, layer,
                       scale):
    cache = self.write(latent_BTC, rope_BTR, positions_BT, layer)
    return cache, cache.attend(q_lat_BTNC, q_rope_BTNR, positions_BT, layer, scale)

  def _where(self, layer, blocks, offsets=None):
    """Index tuple into a pool: (layer,)? + blocks (+ offsets)."""
    lead = () if layer is None else (layer,)
    return lead + (blocks,) + (() if offsets is None else (offsets,))

  def write(self, latent_BTC, rope_BTR, positions_BT, layer) -> "PagedLatentCache":
    """Each new token at its row's block for its position (past the table: the scratch block)."""
    P, MB = self.block_size, self.table_BM.shape[1]
    pos_BT = positions_BT.astype(jnp.int32)
    j_BT = pos_BT // P
    inside_BT = (j_BT >= 0) & (j_BT < MB)
    blocks_BT = jnp.where(inside_BT, jnp.take_along_axis(self.table_BM, jnp.clip(j_BT, 0, MB - 1),
                                                         axis=1), SCRATCH)
    offsets_BT = jnp.where(inside_BT, pos_BT % P, 0)
    at = self._where(layer, blocks_BT, offsets_BT)

    def scatter(pool, new):
      return pool.at[at].set(new)

    def write(pool, new):   # XLA:CPU widens a bf16 / f8 scatter: the kernel copies the rows
      return cpu_kernels.choose(
          cpu_kernels.write_applies(pool),
          lambda p, n: cpu_kernels.latent_write(p, n, blocks_BT * P + offsets_BT, layer),
          scatter, pool, new)

    # Each pool in its own dtype (an FP8 latent pool keeps its rope key in bf16).
    lat, rope = self.latent_pool, self.rope_pool
    return self.replace(latent_pool=write(lat, to_cache_dtype(latent_BTC, lat.dtype)),
                        rope_pool=write(rope, to_cache_dtype(rope_BTR, rope.dtype)))

  def attend(self, q_lat_BTNC, q_rope_BTNR, positions_BT, layer, scale) -> jax.Array:
    """`mla.online_latent_attention` (the contiguous cache's kernel) over the row's positions
    <= each query's, its blocks read in groups of `group` through the table, up to the group of
    the furthest query: -> [B, T, N, C] in the query's dtype."""
    P, G = self.block_size, self.group
    B = q_lat_BTNC.shape[0]
    MB = self.table_BM.shape[1]
    n_groups = -(-MB // G)
    table_BM = jnp.pad(self.table_BM, ((0, 0), (0, n_groups * G - MB)), constant_values=SCRATCH)
    used = jnp.clip(jnp.max(positions_BT).astype(jnp.int32) // (G * P) + 1, 0, n_groups)

    def read_block(g):   # G blocks of P slots: positions [g G P, (g + 1) G P) of every row
      blocks_BG = jax.lax.dynamic_slice_in_dim(table_BM, g * G, G, axis=1)
      lat_BSC = self.latent_pool[self._where(layer, blocks_BG)].reshape(B, G * P, -1)
      rope_BSR = self.rope_pool[self._where(layer, blocks_BG)].reshape(B, G * P, -1)
      return lat_BSC, rope_BSR, g * G * P

    def blocked():
      return online_latent_attention(q_lat_BTNC, q_rope_BTNR, read_block, used, G * P,
                                     positions_BT, scale)

    # One pass through the table on the CPU (kernels/cpu.py); XLA's blocked loop elsewhere.
    return cpu_kernels.choose(
        cpu_kernels.applies(q_lat_BTNC, self.latent_pool, self.rope_pool),
        lambda *a: cpu_kernels.latent_decode(*a, layer, scale, table=self.table_BM),
        lambda *_: blocked(),
        q_lat_BTNC, q_rope_BTNR, self.latent_pool, self.rope_pool, positions_BT)


def init_pools(cfg: ModelConfig, num_blocks: int, block_size: int, dtype=None,
               layers: int | None = None) -> tuple[jax.Array, jax.Array]:
  """Zeroed pools [L, NB, P, C] and [L, NB, P, R] (`layers=0`: one layer without the L axis)."""
  dt = dtype or dtype_of(cfg.dtype)
  lead = () if layers == 0 else (cfg.num_layers if layers is None else layers,)
  return (jnp.zeros(lead + (num_blocks, block_size, cfg.kv_lora_rank), dt),
          jnp.zeros(lead + (num_blocks, block_size, cfg.qk_rope_head_dim), dt))


def init_model_pools(cfg: ModelConfig, num_blocks: int, block_size: int, dtype=None) -> dict:
  """The Transformer's pools by stack ({'dense': (latent, rope), 'moe': ...}; None if empty)."""
  return {name: (init_pools(cfg, num_blocks, block_size, dtype, n) if n else None)
          for name, n in (("dense", cfg.first_k_dense_replace), ("moe", cfg.num_moe_layers))}


def model_cache(pools: dict, table_BM, group: int = 8) -> dict:
  """The cache the Transformer takes, reading `pools` through `table_BM`."""
  return {name: None if p is None else PagedLatentCache(p[0], p[1], table_BM, group)
          for name, p in pools.items()}


def pools_of(cache: dict) -> dict:
  """Inverse of `model_cache`: the (updated) pools of a Transformer's returned cache."""
  return {name: None if c is None else (c.latent_pool, c.rope_pool) for name, c in cache.items()}


def bytes_per_token(cfg: ModelConfig, dtype=None) -> int:
  """(C + R)·L values of the cache dtype: the same as the contiguous latent cache."""
  size = np.dtype(dtype or dtype_of(cfg.dtype)).itemsize
  return (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * cfg.num_layers * size


class OutOfBlocks(RuntimeError):
  pass


class BlockPool:
  """Host-side allocator of the blocks 1..num_blocks-1 (block 0 is `SCRATCH`). Each owner (a
  request id) holds a list of blocks in position order; `reserve` promises blocks ahead (the
  engine reserves a request's worst case at admission, so decoding never runs out)."""

  def __init__(self, num_blocks: int, block_size: int):
    if num_blocks < 2 or block_size < 1:
      raise ValueError(f"num_blocks={num_blocks}, block_size={block_size}: need >= 2 blocks "
                       "(one is scratch) of >= 1 token")
    self.num_blocks, self.block_size = num_blocks, block_size
    self._free = list(range(num_blocks - 1, 0, -1))    # pop() hands out low ids first
    self.owned: dict[object, list[int]] = {}
    self._reserved: dict[object, int] = {}
    self.peak_in_use = 0

  @property
  def free_count(self) -> int:
    return len(self._free)

  @property
  def in_use(self) -> int:
    return self.num_blocks - 1 - len(self._free)

  def available(self) -> int:
    """Blocks neither in use nor promised to an owner."""
    promised = sum(max(r - len(self.owned.get(o, ())), 0) for o, r in self._reserved.items())
    return len(self._free) - promised

  def blocks_for(self, tokens: int) -> int:
    return -(-tokens // self.block_size)

  def reserve(self, owner, tokens: int) -> bool:
    """Promise `owner` blocks for `tokens` positions if available; False (nothing done) if not."""
    need = self.blocks_for(tokens)
    if need - len(self.owned.get(owner, ())) > self.available():
      return False
    self._reserved[owner] = need
    self.owned.setdefault(owner, [])
    return True

  def ensure(self, owner, tokens: int) -> list[int]:
    """`owner`'s blocks, grown to cover positions [0, tokens)."""
    blocks = self.owned.setdefault(owner, [])
    while len(blocks) * self.block_size < tokens:
      if not self._free:
        raise OutOfBlocks(f"the pool's {self.num_blocks - 1} blocks are all in use")
      blocks.append(self._free.pop())
    self.peak_in_use = max(self.peak_in_use, self.in_use)
    return blocks

  def free(self, owner) -> None:
    self._free.extend(reversed(self.owned.pop(owner, [])))
    self._reserved.pop(owner, None)

  def table_row(self, owner, width: int) -> np.ndarray:
    """`owner`'s blocks as a block-table row of `width` entries (SCRATCH past its blocks)."""
    row = np.full(width, SCRATCH, np.int32)
    blocks = self.owned.get(owner, [])
    row[:len(blocks)] = blocks
    return row
