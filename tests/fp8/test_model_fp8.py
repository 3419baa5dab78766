"""The FP8 policy on the real model: which layers it quantises, and a short training run with the
deepseek_v3 recipe against f32 (V3 report App. B.1: <0.25% relative loss gap at scale)."""

import pathlib
import sysconfig

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from deepseek_jax.config import load_config
from deepseek_jax.fp8 import make_policy
from deepseek_jax.model import Transformer
from deepseek_jax.mtp import cross_entropy, mtp_loss

TINY = str(pathlib.Path(__file__).parents[2] / "configs" / "tiny.yaml")


class _Recording:
  """Wraps a policy and records each path the model asks about."""

  def __init__(self, policy):
    self.policy, self.seen = policy, {}

  def dot_general_for(self, path):
    dot = self.policy.dot_general_for(path)
    self.seen[path] = dot is not None
    return dot


def test_model_paths_follow_v3_precision_split():
  cfg = load_config(TINY, ["model.num_layers=2"]).model
  rec = _Recording(make_policy("deepseek_v3"))
  model = Transformer(cfg, fp8_policy=rec)
  jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((2, 8), jnp.int32)))
  high = {p for p, q in rec.seen.items() if not q}
  assert high == {"lm_head", "mtp/layers_0/eh_proj"}, high
  fp8 = {p.rsplit("/", 1)[-1] for p, q in rec.seen.items() if q}
  assert fp8 == {"q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj",
                 "gate_proj", "up_proj", "down_proj"}
  assert any("/experts/" in p for p in rec.seen) and any("shared_experts" in p for p in rec.seen)


def corpus_batches(steps: int, batch: int, seq: int, seed: int = 0) -> list[np.ndarray]:
  """Byte-level batches [batch, seq + 1] from a few files of this Python's standard library."""
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  text = b"".join((root / n).read_bytes() for n in ("json/decoder.py", "json/encoder.py",
                                                     "textwrap.py", "string.py"))
  data = np.frombuffer(text, np.uint8).astype(np.int32)
  starts = np.random.default_rng(seed).integers(0, len(data) - seq - 1, (steps, batch))
  return [np.stack([data[s:s + seq + 1] for s in row]) for row in starts]


def train_tiny(cfg, policy, batches, eval_batches, lr=3e-3):
  """AdamW on CE + MTP + balance loss; returns (per-step train CE, final eval CE)."""
  model = Transformer(cfg, fp8_policy=policy)
  B, T1 = batches[0].shape
  variables = nn.unbox(model.init(jax.random.key(0), jnp.zeros((B, T1 - 1), jnp.int32)))
  params, router_state = variables["params"], variables["router_state"]
  tx = optax.adamw(lr, b1=0.9, b2=0.95, weight_decay=0.1)

  def losses(p, batch):
    tokens, targets = batch[:, :-1], batch[:, 1:]
    out = model.apply({"params": p, "router_state": router_state}, tokens, next_tokens_BT=targets)
    w = jnp.ones(targets.shape, jnp.float32)
    ce = cross_entropy(out.logits_BTV, targets, w)
    mtp, _ = mtp_loss(out.mtp_logits, targets, w, 0.3)
    return ce + mtp + out.aux.get("balance_loss", 0.0), ce

  @jax.jit
  def step(p, opt, batch):
    (_, ce), g = jax.value_and_grad(losses, has_aux=True)(p, batch)
    updates, opt = tx.update(g, opt, p)
    return optax.apply_updates(p, updates), opt, ce

  opt = tx.init(params)
  train_ce = []
  for b in batches:
    params, opt, ce = step(params, opt, jnp.asarray(b))
    train_ce.append(float(ce))
  eval_ce = jax.jit(lambda p, b: losses(p, b)[1])
  return train_ce, float(np.mean([eval_ce(params, jnp.asarray(b)) for b in eval_batches]))


@pytest.mark.slow
def test_deepseek_v3_recipe_trains_like_f32():
  """30 AdamW steps at lr 1e-3, where training is smooth. At 3e-3 the 30-step loss is chaotic:
  two recipes that differ only in f32 summation order (deepseek_v3 vs deepseek_v3_fused) then
  end 11% apart, which says nothing about FP8; at 1e-3 they end 0.1% apart."""
  cfg = load_config(TINY, ["model.num_layers=2"]).model
  batches = corpus_batches(30, 8, 64)
  evals = corpus_batches(8, 8, 64, seed=1)
  ce32, eval32 = train_tiny(cfg, None, batches, evals, lr=1e-3)
  ce8, eval8 = train_tiny(cfg, make_policy("deepseek_v3"), batches, evals, lr=1e-3)
  gap = (eval8 - eval32) / eval32
  print(f"eval CE after 30 steps: f32 {eval32:.4f}, deepseek_v3 {eval8:.4f}, rel gap {gap:+.4%}")
  assert ce32[-1] < 0.7 * ce32[0] and ce8[-1] < 0.7 * ce8[0]    # both learn
  assert abs(gap) < 0.01
