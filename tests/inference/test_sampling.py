"""Sampling distributions (greedy, temperature, top-k, top-p) and speculative acceptance."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from deepseek_jax.generate import Sampling, sample, sampling_probs
from deepseek_jax.generate.speculative import accept

_probs = jax.jit(sampling_probs)


def _reference(logits: np.ndarray, t: float, k: int, p: float) -> np.ndarray:
  """NumPy oracle: tempered softmax, keep the top k, then the smallest prefix with mass >= p."""
  x = logits.astype(np.float64) / t
  order = np.argsort(-x)
  keep = np.zeros(len(x), bool)
  keep[order[:k if k else len(x)]] = True
  probs = np.where(keep, np.exp(x - x.max()), 0.0)
  probs /= probs.sum()
  cum, kept = 0.0, np.zeros(len(x), bool)
  for i in order:
    if not keep[i] or cum >= p:
      break
    kept[i], cum = True, cum + probs[i]
  out = np.where(kept, probs, 0.0)
  return out / out.sum()


@given(seed=st.integers(0, 2**16), t=st.floats(0.3, 3.0), k=st.integers(0, 12),
       p=st.floats(0.05, 1.0))
def test_filtered_distribution_matches_numpy_oracle(seed, t, k, p):
  logits = np.random.default_rng(seed).normal(size=(2, 12)).astype(np.float32) * 3
  got = np.asarray(_probs(jnp.asarray(logits), Sampling(t, k, p).arrays()))
  for b in range(2):
    np.testing.assert_allclose(got[b], _reference(logits[b], t, k, p), atol=2e-6)


def test_greedy_is_argmax_whatever_the_filters():
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 50)), jnp.float32)
  for s in (Sampling(), Sampling(0.0, 5, 0.3)):
    probs = np.asarray(_probs(logits, s.arrays()))
    np.testing.assert_array_equal(probs.argmax(-1), np.asarray(logits).argmax(-1))
    np.testing.assert_array_equal(probs.max(-1), 1.0)
    np.testing.assert_array_equal(np.asarray(sample(jax.random.key(0), logits, s.arrays())),
                                  np.asarray(logits).argmax(-1))


def test_sample_frequencies_follow_the_distribution():
  logits = jnp.asarray([[2.0, 1.0, 0.5, -1.0, 0.0]], jnp.float32)
  s = Sampling(0.8, 4, 0.95).arrays()
  draws = jax.vmap(lambda k: sample(k, logits, s)[0])(jax.random.split(jax.random.key(0), 40000))
  freq = np.bincount(np.asarray(draws), minlength=5) / 40000
  np.testing.assert_allclose(freq, np.asarray(sampling_probs(logits, s))[0], atol=0.01)


@pytest.mark.parametrize("seed", [0, 1])
def test_speculative_acceptance_preserves_the_target_distribution(seed):
  """Draft d ~ q; emit d if accepted else the residual bonus: the first token ~ p0, and after
  an acceptance the bonus ~ p1 (speculative sampling, arXiv 2211.17192 Thm. 1)."""
  V, N = 5, 200_000
  rng = np.random.default_rng(seed)
  p0, p1, q = (rng.dirichlet(np.ones(V)).astype(np.float32) for _ in range(3))
  k_draft, k_acc = jax.random.split(jax.random.key(seed))
  draft = jax.random.categorical(k_draft, jnp.log(jnp.asarray(q)), shape=(N,)).astype(jnp.int32)
  tile = lambda a: jnp.broadcast_to(jnp.asarray(a), (N, V))  # noqa: E731
  accepted, bonus = accept(k_acc, tile(p0), tile(p1), tile(q), draft)
  first = np.where(np.asarray(accepted), np.asarray(draft), np.asarray(bonus))
  np.testing.assert_allclose(np.bincount(first, minlength=V) / N, p0, atol=5e-3)
  after = np.asarray(bonus)[np.asarray(accepted)]
  np.testing.assert_allclose(np.bincount(after, minlength=V) / len(after), p1, atol=1e-2)
  expected_rate = np.minimum(p0, q).sum()  # P(accept) = sum_x min(p0(x), q(x))
  assert abs(np.asarray(accepted).mean() - expected_rate) < 5e-3


def test_invalid_sampling_settings_raise():
  for kw, match in ((dict(temperature=-1.0), "temperature"), (dict(top_k=-2), "top_k"),
                    (dict(top_p=0.0), "top_p"), (dict(top_p=1.5), "top_p")):
    with pytest.raises(ValueError, match=match):
      Sampling(**kw)
