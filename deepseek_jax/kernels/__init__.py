"""Kernels that XLA cannot fuse on a backend, each behind the function the model calls.

`cpu`: the absorbed MLA decode attention as one pass over the latent cache on the CPU (an XLA FFI
custom call built from `latent_decode.cc` with the system's C++ compiler on first use). GPUs and
TPUs keep XLA's blocked loop (`mla.online_latent_attention`).
"""
