#!/usr/bin/env bash
# The device check (one H200, a few minutes): real FP8 GEMMs, MoE grouped matmul (ragged_dot vs
# block), and the foundation numbers (MFU vs a bf16 peak, compile ratio, absorbed vs expanded
# decode) for configs/small.yaml. Run from the repo root; logs go to $OUT (or ./gpu_out).
set -u
OUT=${OUT:-gpu_out}; mkdir -p "$OUT"
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$OUT/gpu.txt"
python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, jax.devices())" 2>&1 | tee -a "$OUT/gpu.txt"
timeout 150 python3 bench/gpu_fp8.py > "$OUT/fp8.log" 2>&1; echo "fp8 rc=$?" | tee -a "$OUT/gpu.txt"; tail -3 "$OUT/fp8.log"
timeout 120 python3 bench/bench_moe.py --ragged --batch 8 --seq 1024 --d-model 1024 --moe-ffn-dim 704 --k 6 --experts 8,64 --rounds 5 > "$OUT/moe.log" 2>&1; echo "moe rc=$?" | tee -a "$OUT/gpu.txt"; tail -12 "$OUT/moe.log"
timeout 200 python3 bench/bench_foundation.py --config configs/small.yaml --batch 8 --seq 2048 --context 8192 > "$OUT/foundation.log" 2>&1; echo "foundation rc=$?" | tee -a "$OUT/gpu.txt"; tail -25 "$OUT/foundation.log"
