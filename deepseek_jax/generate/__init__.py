"""Inference on the latent cache: prefill + decode with sampling (`decode`), MTP self-speculative
decoding (`speculative`), weights from either kind of checkpoint (`load`), a continuous-batching
`Engine` on a paged latent cache (`engine`, `paged`, `steps`), and the `python -m
deepseek_jax.generate` and `python -m deepseek_jax.generate.serve` commands."""

from deepseek_jax.generate.decode import (Carry, Emit, Generation, Sampling, SamplingArrays,
                                          Tokens, decode_loop, decode_step, generate, sample,
                                          sampling_probs, speculative_step)
from deepseek_jax.generate.engine import Engine, Request
from deepseek_jax.generate.load import load_for_inference, load_trained

__all__ = ["Carry", "Emit", "Engine", "Generation", "Request", "Sampling", "SamplingArrays",
           "Tokens", "decode_loop", "decode_step", "generate", "load_for_inference", "load_trained", "sample",
           "sampling_probs", "speculative_step"]
