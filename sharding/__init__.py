"""Sharding: meshes, logical axis rules, state shardings, expert parallelism and multi-host start.

`mesh.make_mesh(cfg.mesh)` -> `rules.rules_from_config(cfg.mesh)` -> the model built with
`expert_parallel.runner(cfg.model, cfg.mesh, mesh, rules)` -> `specs.init_sharded(...)` under
`mesh.activate(mesh, rules)`; `distributed.initialize(...)` first on multi-host runs.
Model code names logical axes only; this package never imports the model (it reuses the pure
grouped-FFN of `deepseek_jax.dispatch` inside `expert_parallel.py`, the only `shard_map`).
"""
