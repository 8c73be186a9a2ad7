#!/usr/bin/env bash
# Every GPU parity test and speed benchmark, in one go (< 8 minutes on one H200).
# Installs nothing from the network: run it in an environment where `pip install -e ".[dev]"`
# (and optionally the `cuda` extra) is already done. Results go to benchmarks/gpu/.
set -uo pipefail
cd "$(dirname "$0")/.."
out=benchmarks/gpu
mkdir -p "$out"
stamp=$(date -u +%Y%m%dT%H%M%SZ)
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
log="$out/${stamp}_${gpu}.log"
status=0
exec > >(tee "$log") 2>&1
echo "# $(date -u) on $gpu, torch $(python -c 'import torch; print(torch.__version__, torch.version.cuda)')"
python -c "import importlib.util as u; print('mamba_ssm:', bool(u.find_spec('mamba_ssm')), 'causal_conv1d:', bool(u.find_spec('causal_conv1d')), 'triton:', bool(u.find_spec('triton')))"
echo "## parity tests on CUDA (pytest -m cuda)"
python -m pytest -q -m cuda tests || status=1
echo "## inference speed, fp32, batch 64 and batch 1"
for bs in 64 1; do
  python tools/benchmark.py --device cuda --models 'vim_*' deit_tiny_patch16_224 deit_small_patch16_224 \
    --batch-size "$bs" --warmup 5 --reps 20 --max-timed-params 1e9 --csv "$out/${stamp}_${gpu}_bs${bs}.csv" || status=1
done
echo "## BiFormer BRA: reference (official gather) / chunked / triton, fwd and fwd+bwd, tiny's stage shapes at 224, batch 64"
timeout 120 python benchmarks/bench_routing_attention_cuda.py --batch 64 --reps 20 || status=1
echo "## sparse_attention: triton / masked / gather / reference, fwd and fwd+bwd, DeiT-S shapes at 224 and 384, batch 64, fp32 and bf16"
timeout 90 python benchmarks/bench_sparse_attention_cuda.py --json "$out/${stamp}_${gpu}_sparse_attention.json" || status=1
echo "## Sparsifiner DeiT-S model, batch 64, 224 and 384: backends end to end"
timeout 120 python benchmarks/bench_sparsifiner_cpu.py --device cuda --threads 16 --batch 64 --sizes 224 384 --parts model --rounds 3 || status=1
echo "## OverLoCK na2d_av on CUDA: triton / dense / taps vs reference (fwd, fwd+bwd, error), overlock_t ContMix shapes batch 64, overlock_xt model"
timeout 120 python benchmarks/bench_neighborhood_aggregation_cuda.py --reps 10 || status=1
echo "## selective scan, Vim-S (64 x 768/direction x 197, N 16): triton fwd+bwd vs mamba_ssm selective_scan_fn vs chunked; fused bidirectional vs official two-call"
timeout 90 python benchmarks/bench_selective_scan_cuda.py --batch 64 --dim 768 --length 197 --dstate 16 --reps 20 || status=1
echo "## vim_tiny vs DeiT-Ti against resolution (issue #3: the paper's 2.8x speed / -86.8% memory at 1248), bf16, batch 16"
for scan in auto triton; do
  VISIONZOO_BACKEND_SELECTIVE_SCAN=$([ "$scan" = triton ] && echo triton) timeout 150 python tools/benchmark.py \
    --device cuda --precision bf16 --models vim_tiny deit_tiny_patch16_224 --img-size 512 1024 1248 --batch-size 16 \
    --warmup 3 --reps 10 --tag "gpu_resolution_scan_$scan" --out-dir "$out" || status=1
done
TIMM_FUSED_ATTN=0 timeout 90 python tools/benchmark.py --device cuda --precision bf16 --models deit_tiny_patch16_224 \
  --img-size 512 1024 1248 --batch-size 16 --warmup 3 --reps 10 --tag gpu_deit_plain_attention --out-dir "$out" || status=1
exit $status
