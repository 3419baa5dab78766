"""Builds tiny Hugging Face DeepSeek checkpoints and reference outputs for the parity tests.

Reference semantics: `reference/deepseek-semantics.md` §2-4 and §6. Run it in a throwaway venv
(the test suite itself needs no torch):

  python -m venv /tmp/hfvenv
  /tmp/hfvenv/bin/pip install torch==2.13.0 transformers safetensors numpy
  /tmp/hfvenv/bin/python scripts/make_hf_fixtures.py --out tests/fixtures/hf

Writes three fixtures, each a checkpoint directory (config.json + safetensors) with a
`reference.npz` of inputs and transformers outputs, all fp32 and torch single-threaded:

- `v3_tiny`: DeepseekV3ForCausalLM, every V3 feature on (YaRN as in V3, q compression, sigmoid
  routing with a random non-zero e_score_correction_bias, group-limited top-k, perturbed norms),
  plus one MTP layer at `model.layers.{num_hidden_layers}` (HF's generic `MtpModel`); stored as two
  shards with `model.safetensors.index.json`.
- `v2_tiny`: DeepseekV2ForCausalLM in the V2 / V2-Lite layout (no query compression, softmax
  routing, max-of-group limited greedy, no routing bias, no top-k normalisation), single file,
  config.json in the legacy `rope_scaling` form of the released V2 configs.
- `v3_fp8_tiny`: a V3 checkpoint in DeepSeek's FP8 format (E4M3 weights with 128x128 block
  `weight_scale_inv`, widths not multiples of 128, a 200-row `kv_a_proj_with_mqa`); the reference
  runs HF in fp32 on the weights dequantised by the exact rule.

Recorded: input ids; prefill logits; logits of a one-token and a three-token cached step; routing
indices of every MoE layer; MTP logits; HF `generate` greedy continuations of a ragged
(left-padded) batch with the logits of every step.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import re
import shutil
import sys

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from transformers import (DeepseekV2Config, DeepseekV2ForCausalLM, DeepseekV3Config,
                          DeepseekV3ForCausalLM)
from transformers.modeling_layers import MtpModel

torch.set_num_threads(1)  # the harness shares 2 cores; OpenMP oversubscription costs 10x here

YARN = {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096,
        "beta_fast": 32.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0,
        "rope_theta": 10000.0}


def v3_config(**kw) -> DeepseekV3Config:
  base = dict(vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
              num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2,
              n_shared_experts=1, n_routed_experts=8, num_experts_per_tok=2, n_group=4,
              topk_group=2, first_k_dense_replace=1, q_lora_rank=16, kv_lora_rank=16,
              qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8, routed_scaling_factor=2.5,
              norm_topk_prob=True, max_position_embeddings=163840, rope_parameters=dict(YARN),
              rope_interleave=True, num_mtp_layers=1, tie_word_embeddings=False,
              initializer_range=0.1, rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1,
              eos_token_id=2)
  base.update(kw)
  cfg = DeepseekV3Config(**base)
  cfg._attn_implementation = "eager"
  return cfg


def randomize(module: torch.nn.Module, gen: torch.Generator) -> None:
  """Random weights (std 0.1), norms 1 + 0.1 N(0,1), routing biases 0.1 N(0,1)."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
      p.copy_(1.0 + 0.1 * noise if "norm" in name else 0.1 * noise)
    for name, b in module.named_buffers():
      if name.endswith("e_score_correction_bias"):
        b.copy_(0.1 * torch.randn(b.shape, generator=gen, dtype=torch.float32))


def unfuse_experts(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """HF 5 in-memory fused experts -> the checkpoint's per-expert names (semantics §4)."""
  out = {}
  for k, v in state.items():
    m = re.match(r"(.*mlp\.experts)\.(gate_up_proj|down_proj)$", k)
    if not m:
      out[k] = v
      continue
    prefix, kind = m.groups()
    for j in range(v.shape[0]):
      if kind == "gate_up_proj":
        M = v.shape[1] // 2
        out[f"{prefix}.{j}.gate_proj.weight"] = v[j, :M].contiguous()
        out[f"{prefix}.{j}.up_proj.weight"] = v[j, M:].contiguous()
      else:
        out[f"{prefix}.{j}.down_proj.weight"] = v[j].contiguous()
  return out


def mtp_checkpoint_tensors(mtp: MtpModel, n_layers: int) -> dict[str, torch.Tensor]:
  """MtpModel weights under the released names: model.layers.{n + k}.{enorm, hnorm, eh_proj,
  shared_head.norm, embed_tokens, shared_head.head, <decoder block names>}."""
  out = {}
  for k, layer in enumerate(mtp.layers):
    pre = f"model.layers.{n_layers + k}."
    state = unfuse_experts({n: t.detach().clone() for n, t in layer.state_dict().items()})
    for name, t in state.items():
      if name.startswith("mtp_block."):
        out[pre + name[len("mtp_block."):]] = t
      elif name.startswith("post_norm."):
        out[pre + "shared_head.norm." + name[len("post_norm."):]] = t
      else:
        out[pre + name] = t
    out[pre + "embed_tokens.weight"] = mtp.embed_tokens.weight.detach().clone()
    out[pre + "shared_head.head.weight"] = mtp.shared_head.weight.detach().clone()
  return out


def router_indices(model: torch.nn.Module, run) -> list[np.ndarray]:
  """Sorted top-k expert indices [tokens, K] of every router, in call order."""
  found = []
  hooks = [m.register_forward_hook(lambda _m, _i, out: found.append(
      np.sort(out[2].numpy(), axis=-1).astype(np.int32)))
           for m in model.modules() if type(m).__name__.endswith("TopkRouter")]
  try:
    run()
  finally:
    for h in hooks:
      h.remove()
  return found


def cached_steps(model, ids: torch.Tensor, split: int) -> np.ndarray:
  """Prefill ids[:, :split] with a cache, then feed ids[:, split:] in one cached call."""
  out = model(ids[:, :split], use_cache=True)
  return model(ids[:, split:], cache=out.cache, use_cache=True).logits.numpy()


def ragged_generate(model, prompts: list[list[int]], new_tokens: int, pad_id: int):
  """Greedy HF generate on a left-padded batch; returns (tokens [B, new], logits [B, new, V])."""
  P = max(len(p) for p in prompts)
  ids = torch.tensor([[pad_id] * (P - len(p)) + p for p in prompts])
  mask = torch.tensor([[0] * (P - len(p)) + [1] * len(p) for p in prompts])
  out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens,
                       min_new_tokens=new_tokens, do_sample=False, output_logits=True,
                       return_dict_in_generate=True, pad_token_id=pad_id, eos_token_id=None)
  logits = torch.stack(out.logits, dim=1).numpy()
  # Each row alone must give the same continuation (positions come from the mask).
  for b, p in enumerate(prompts):
    alone = model.generate(torch.tensor([p]), max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=pad_id, eos_token_id=None)
    if not torch.equal(alone[0, len(p):], out.sequences[b, P:]):
      raise SystemExit(f"HF left-padded generate differs from row {b} alone")
  return out.sequences[:, P:].numpy().astype(np.int32), logits


def min_margin(logits: np.ndarray) -> float:
  top2 = np.sort(logits, axis=-1)[..., -2:]
  return float(np.min(top2[..., 1] - top2[..., 0]))


def write_shards(state: dict[str, torch.Tensor], out: pathlib.Path, n_shards: int) -> None:
  names = sorted(state)
  if n_shards == 1:
    save_file({k: state[k].contiguous() for k in names}, out / "model.safetensors",
              metadata={"format": "pt"})
    return
  per = math.ceil(len(names) / n_shards)
  weight_map, total = {}, 0
  for s in range(n_shards):
    fname = f"model-{s + 1:05d}-of-{n_shards:05d}.safetensors"
    part = {k: state[k].contiguous() for k in names[s * per:(s + 1) * per]}
    save_file(part, out / fname, metadata={"format": "pt"})
    for k, v in part.items():
      weight_map[k] = fname
      total += v.numel() * v.element_size()
  (out / "model.safetensors.index.json").write_text(json.dumps(
      {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2, sort_keys=True))


def reference_outputs(model, vocab: int, gen: torch.Generator) -> dict[str, np.ndarray]:
  ids = torch.randint(3, vocab, (2, 12), generator=gen)
  ref = {"input_ids": ids.numpy().astype(np.int32)}
  with torch.no_grad():
    def prefill():
      ref["logits_prefill"] = model(ids).logits.numpy()
    routes = router_indices(model, prefill)
    if routes:
      ref["routing_prefill"] = np.stack(routes)  # [L_moe, B*T, K]
    ref["logits_step1"] = cached_steps(model, ids, 11)   # positions 11
    ref["logits_step3"] = cached_steps(model, ids, 9)    # positions 9, 10, 11
    prompts = [ids[0, :8].tolist(), ids[1, :5].tolist()]
    ref["gen_prompt_lens"] = np.array([8, 5], np.int32)
    ref["gen_tokens"], ref["gen_logits"] = ragged_generate(model, prompts, 10, pad_id=0)
  print(f"  greedy margin (min top-1 minus top-2 logit over the continuations): "
        f"{min_margin(ref['gen_logits']):.2e}")
  return ref


def make_v3(out: pathlib.Path, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  cfg = v3_config()
  model = DeepseekV3ForCausalLM(cfg).eval()
  randomize(model, gen)
  ref = reference_outputs(model, cfg.vocab_size, gen)
  # MTP depth 1 (V3 §2.2): HF's generic MtpModel on the post-norm hidden state.
  mtp = MtpModel(model, 1).eval()
  randomize(mtp.layers, gen)
  ids = torch.from_numpy(ref["input_ids"]).long()
  next_ids = torch.cat([ids[:, 1:], ids[:, -1:]], dim=1)  # filler at the end, as our model does
  with torch.no_grad():
    hidden = model.model(ids).last_hidden_state
    pos = torch.arange(ids.shape[1])[None].expand(ids.shape[0], -1)
    def run_mtp():
      h = mtp.forward_layer(0, hidden, pos, None, input_ids=next_ids)
      ref["mtp_logits"] = mtp._project_to_logits(h).numpy()
    ref["mtp_routing"] = np.stack(router_indices(mtp, run_mtp))
  model.save_pretrained(out / "_hf", safe_serialization=True)
  saved = {}
  for f in sorted((out / "_hf").glob("*.safetensors")):
    saved.update(load_file(f))
  mine = unfuse_experts(dict(model.state_dict()))
  if set(saved) != set(mine) or any(not torch.equal(saved[k], mine[k]) for k in saved):
    raise SystemExit("per-expert split disagrees with save_pretrained")
  saved.update(mtp_checkpoint_tensors(mtp, cfg.num_hidden_layers))
  shutil.copy(out / "_hf" / "config.json", out / "config.json")
  shutil.rmtree(out / "_hf")
  write_shards(saved, out, n_shards=2)
  # The written directory must reproduce the references in transformers itself, MTP included
  # (HF's MTP key pattern is hard-coded to layer 61: point it at layer num_hidden_layers).
  DeepseekV3ForCausalLM._keys_to_ignore_on_load_unexpected = [
      rf"model\.layers\.{cfg.num_hidden_layers}.*"]
  again = DeepseekV3ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  mtp2 = MtpModel.from_pretrained(again)
  with torch.no_grad():
    check(again(ids).logits.numpy(), ref["logits_prefill"], "v3 reload")
    h = mtp2.forward_layer(0, again.model(ids).last_hidden_state, pos, None, input_ids=next_ids)
    check(mtp2._project_to_logits(h).numpy(), ref["mtp_logits"], "v3 MTP reload")
  np.savez_compressed(out / "reference.npz", **ref)


def make_v2(out: pathlib.Path, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  rope = dict(YARN, mscale=0.707, mscale_all_dim=0.707)
  cfg = DeepseekV2Config(
      vocab_size=128, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
      num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=2, n_shared_experts=2,
      n_routed_experts=8, num_experts_per_tok=3, n_group=4, topk_group=2,
      topk_method="group_limited_greedy", first_k_dense_replace=1, q_lora_rank=None,
      kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=8, v_head_dim=8,
      routed_scaling_factor=1.0, norm_topk_prob=False, max_position_embeddings=163840,
      rope_parameters=rope, tie_word_embeddings=False, initializer_range=0.1, pad_token_id=0,
      bos_token_id=1, eos_token_id=2)
  cfg._attn_implementation = "eager"
  model = DeepseekV2ForCausalLM(cfg).eval()
  randomize(model, gen)
  ref = reference_outputs(model, cfg.vocab_size, gen)
  model.save_pretrained(out / "_hf", safe_serialization=True)
  state = load_file(out / "_hf" / "model.safetensors")
  config = json.loads((out / "_hf" / "config.json").read_text())
  shutil.rmtree(out / "_hf")
  # The released V2 configs carry the legacy rope form and the V2 routing fields.
  params = config.pop("rope_parameters")
  config["rope_theta"] = params.pop("rope_theta")
  params["type"] = params.pop("rope_type")
  config["rope_scaling"] = params
  config.update(scoring_func="softmax", moe_layer_freq=1, num_nextn_predict_layers=0)
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  write_shards(state, out, n_shards=1)
  again = DeepseekV2ForCausalLM.from_pretrained(out, attn_implementation="eager").eval()
  with torch.no_grad():
    check(again(torch.from_numpy(ref["input_ids"]).long()).logits.numpy(), ref["logits_prefill"],
          "v2 reload (legacy rope_scaling)")
  np.savez_compressed(out / "reference.npz", **ref)


def quantize_fp8(w: torch.Tensor, block: int = 128) -> tuple[torch.Tensor, torch.Tensor]:
  """Reference block quantizer (README_WEIGHTS): zero-pad to whole blocks, scale = amax / 448."""
  R, C = w.shape
  gr, gc = -(-R // block), -(-C // block)
  padded = torch.zeros(gr * block, gc * block, dtype=torch.float32)
  padded[:R, :C] = w.float()
  blocks = padded.view(gr, block, gc, block)
  scale = blocks.abs().amax(dim=(1, 3)) / 448.0
  q = (blocks / scale[:, None, :, None]).view(gr * block, gc * block)[:R, :C]
  return q.to(torch.float8_e4m3fn), scale.float()


def dequantize_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: int = 128) -> torch.Tensor:
  """W[r, c] = float32(q[r, c]) * scale_inv[r // 128, c // 128] (semantics §3)."""
  R, C = q.shape
  s = scale_inv.repeat_interleave(block, 0)[:R].repeat_interleave(block, 1)[:, :C]
  return q.float() * s


def make_fp8(out: pathlib.Path, seed: int) -> None:
  gen = torch.Generator().manual_seed(seed)
  cfg = v3_config(vocab_size=64, hidden_size=144, intermediate_size=64, moe_intermediate_size=16,
                  num_hidden_layers=2, n_routed_experts=4, num_experts_per_tok=2, n_group=2,
                  topk_group=1, q_lora_rank=136, kv_lora_rank=192, qk_nope_head_dim=16,
                  qk_rope_head_dim=8, v_head_dim=16, num_mtp_layers=0)
  model = DeepseekV3ForCausalLM(cfg).eval()
  randomize(model, gen)
  disk = unfuse_experts(dict(model.state_dict()))
  skip = re.compile(r"(embed_tokens|lm_head|norm|mlp\.gate\.weight|e_score_correction_bias)")
  quantized: dict[str, torch.Tensor] = {}
  for name in sorted(disk):
    t = disk[name]
    if name.endswith(".weight") and t.ndim == 2 and not skip.search(name):
      q, s = quantize_fp8(t)
      quantized[name], quantized[name + "_scale_inv"] = q, s
      disk[name] = dequantize_fp8(q, s)
    elif name.endswith("e_score_correction_bias"):
      quantized[name] = t.float()  # the release keeps the routing bias fp32, the rest bf16
    else:
      quantized[name] = t.to(torch.bfloat16)
      disk[name] = quantized[name].float()
  # Load the exact dequantised weights back into the fp32 model (re-fusing the experts).
  state = dict(model.state_dict())
  for k in state:
    m = re.match(r"(.*mlp\.experts)\.(gate_up_proj|down_proj)$", k)
    if m:
      E = state[k].shape[0]
      if m.group(2) == "gate_up_proj":
        pre = m.group(1)
        state[k] = torch.stack([torch.cat([disk[f"{pre}.{j}.gate_proj.weight"],
                                           disk[f"{pre}.{j}.up_proj.weight"]]) for j in range(E)])
      else:
        state[k] = torch.stack([disk[f"{m.group(1)}.{j}.down_proj.weight"] for j in range(E)])
    else:
      state[k] = disk[k]
  model.load_state_dict(state)
  ref = reference_outputs(model, cfg.vocab_size, gen)
  name = "model.layers.0.self_attn.kv_a_proj_with_mqa.weight"
  ref["kv_a_dequant"] = disk[name].numpy()
  ref["kv_a_name"] = np.array(name)
  # config.json in the form of the released V3 one: legacy rope_scaling, no rope_interleave.
  config = json.loads(cfg.to_json_string(use_diff=False))
  params = config.pop("rope_parameters")
  config["rope_theta"] = params.pop("rope_theta")
  params["type"] = params.pop("rope_type")
  config["rope_scaling"] = params
  for k in ("rope_interleave", "head_dim", "qk_head_dim", "dtype"):
    config.pop(k, None)
  config.update(architectures=["DeepseekV3ForCausalLM"], torch_dtype="bfloat16",
                scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1,
                quantization_config={"activation_scheme": "dynamic", "fmt": "e4m3",
                                     "quant_method": "fp8", "weight_block_size": [128, 128]})
  (out / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
  write_shards(quantized, out, n_shards=1)
  np.savez_compressed(out / "reference.npz", **ref)


def check(got: np.ndarray, want: np.ndarray, what: str) -> None:
  err = float(np.max(np.abs(got - want)) / np.max(np.abs(want)))
  print(f"  {what}: max relative difference {err:.1e}")
  if err > 1e-5:
    raise SystemExit(f"{what}: transformers does not reproduce its own reference ({err:.1e})")


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--out", default="tests/fixtures/hf")
  ap.add_argument("--seed", type=int, default=0)
  args = ap.parse_args(argv)
  root = pathlib.Path(args.out)
  for name, fn in (("v3_tiny", make_v3), ("v2_tiny", make_v2), ("v3_fp8_tiny", make_fp8)):
    d = root / name
    if d.exists():
      shutil.rmtree(d)
    d.mkdir(parents=True)
    print(f"{name}:")
    fn(d, args.seed)
  total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
  print(f"wrote {root} ({total / 1024:.0f} KiB)")
  return 0


if __name__ == "__main__":
  sys.exit(main())
