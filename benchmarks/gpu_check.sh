#!/usr/bin/env bash
# Every GPU parity test and benchmark of visionzoo in one go: < 8 minutes on one H100, no network.
#
#   bash benchmarks/gpu_check.sh             # on a CUDA machine; results under benchmarks/results/gpu/<stamp>_<gpu>/
#   bash benchmarks/gpu_check.sh --dry-run   # on CPU at tiny sizes (Triton in its interpreter): checks this script
#
# Run it where `pip install -e ".[dev]"` (and optionally mamba-ssm, causal-conv1d, natten) is already done;
# it installs nothing. Steps (each with a time limit; a failing step is reported and the script goes on,
# exit status 1 at the end):
#   1. parity: every test marked `cuda` (Triton, flex, mamba-ssm and reference backends on the GPU);
#   2. per op, forward and forward+backward: selective scan (triton vs mamba-ssm selective_scan_fn vs chunked,
#      Vim-S mixer; bar: fused triton <= 1.2x two mamba-ssm calls), routing attention (reference / chunked /
#      flex / triton), sparse attention (triton / flex / masked / gather / reference), na2d_av
#      (triton / natten / dense / taps vs reference);
#   3. vim_tiny vs DeiT-Ti at 1248 in bf16, inference speed and peak memory, DeiT with plain attention
#      (TIMM_FUSED_ATTN=0, as the Vim paper measured) and with fused SDPA;
#   4. one bf16 training step per family (speed and peak memory).
# Then read the logs and set each op's CUDA `auto` order from the numbers (benchmarks/gpu_compile.md).
set -uo pipefail
cd "$(dirname "$0")/.."

dry=0
case "${1:-}" in
  "") ;;
  --dry-run) dry=1 ;;
  *) echo "gpu_check.sh: unknown argument '$1' (use --dry-run or nothing)" >&2; exit 2 ;;
esac
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1

if [ $dry = 1 ]; then
  # Triton reads TRITON_INTERPRET when it is imported: set before any python starts.
  export TRITON_INTERPRET=1 OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
  out=$(mktemp -d)
  dev=cpu
  label=dry-run
else
  python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" \
    || { echo "gpu_check.sh: no CUDA device visible to torch (use --dry-run on a CPU machine)" >&2; exit 2; }
  unset TRITON_INTERPRET
  dev=cuda
  label=$(python -c "import torch; print(torch.cuda.get_device_name().replace(' ', '_'))")
  out="benchmarks/results/gpu/$(date -u +%Y%m%dT%H%M%SZ)_${label}"
fi
mkdir -p "$out"
status=0
start=$(date +%s)
exec > >(tee "$out/gpu_check.log") 2>&1

step() {  # step NAME SECONDS CMD...: run CMD with a time limit, log its output to $out/NAME.log
  local name=$1 limit=$2
  shift 2
  [ $dry = 1 ] && limit=900  # the dry run checks the commands, not their speed (CPU, interpreter, shared cores)
  echo "## $name ($(($(date +%s) - start)) s elapsed)"
  # A step fails on a non-zero exit, and on an exception printed as an error row (the benchmark tools go on).
  if ! timeout "$limit" "$@" > "$out/$name.log" 2>&1 || grep -qE "[A-Za-z]+(Error|Exception): " "$out/$name.log"; then
    echo "FAILED: $name (see $out/$name.log)"
    tail -n 20 "$out/$name.log"
    status=1
  else
    tail -n 40 "$out/$name.log"
  fi
}

echo "# $(date -u) $label, $(python -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
python -c "import importlib.util as u; print(*(f'{m}: {bool(u.find_spec(m))}' for m in ('triton', 'mamba_ssm', 'causal_conv1d', 'natten')))"

if [ $dry = 1 ]; then
  # Tiny sizes on CPU: each command below is the GPU one with its smoke / size options.
  step parity 120 python -m pytest -q -p no:cacheprovider -m cuda --collect-only tests/ops tests/models
  step selective_scan 120 python benchmarks/bench_selective_scan_cuda.py --device cpu --batch 1 --dim 8 --length 9 \
    --dstate 4 --reps 1 --dtypes fp32
  step routing_attention 120 python benchmarks/bench_routing_attention_cuda.py --smoke
  step sparse_attention 120 python benchmarks/bench_sparse_attention_cuda.py --device cpu --batch 1 --sizes 0 \
    --dtypes float32 --backends triton masked reference --reps 1 --no-sweep --json "$out/sparse_attention.json"
  step neighborhood_aggregation 120 python benchmarks/bench_neighborhood_aggregation_cuda.py --smoke --reps 1 --no-model
  step vim_vs_deit 120 python tools/benchmark.py --device cpu --precision bf16 --models vim_tiny deit_tiny_patch16_224 \
    --img-size 64 --batch-size 1 --warmup 0 --reps 1 --no-plot --out-dir "$out" --tag vim_vs_deit_sdpa
  TIMM_FUSED_ATTN=0 step deit_plain_attention 60 python tools/benchmark.py --device cpu --precision bf16 \
    --models deit_tiny_patch16_224 --img-size 64 --batch-size 1 --warmup 0 --reps 1 --no-plot --out-dir "$out" \
    --tag deit_plain_attention
  step train_step_bf16 300 python tools/benchmark.py --device cpu --precision bf16 --mode train --models vim_tiny \
    biformer_tiny overlock_xt patnet_t0 dependencyvit_lite_tiny sparsifiner_deit_small --batch-size 2 --warmup 0 \
    --reps 1 --no-plot --out-dir "$out" --tag train_step_bf16
else
  step parity 240 python -m pytest -q -p no:cacheprovider -m cuda tests
  step selective_scan 90 python benchmarks/bench_selective_scan_cuda.py --batch 64 --dim 768 --length 197 --dstate 16 --reps 20
  step routing_attention 90 python benchmarks/bench_routing_attention_cuda.py --batch 64 --reps 20 --dtype bfloat16
  step sparse_attention 60 python benchmarks/bench_sparse_attention_cuda.py --backends triton flex masked gather reference \
    --json "$out/sparse_attention.json"
  step neighborhood_aggregation 60 python benchmarks/bench_neighborhood_aggregation_cuda.py --reps 10 --bf16
  step vim_vs_deit 60 python tools/benchmark.py --device cuda --precision bf16 --models vim_tiny deit_tiny_patch16_224 \
    --img-size 1248 --batch-size 16 --warmup 3 --reps 10 --no-plot --out-dir "$out" --tag vim_vs_deit_sdpa
  TIMM_FUSED_ATTN=0 step deit_plain_attention 45 python tools/benchmark.py --device cuda --precision bf16 \
    --models deit_tiny_patch16_224 --img-size 1248 --batch-size 16 --warmup 3 --reps 10 --no-plot --out-dir "$out" \
    --tag deit_plain_attention
  step train_step_bf16 90 python tools/benchmark.py --device cuda --precision bf16 --mode train --models vim_tiny \
    biformer_tiny overlock_xt patnet_t0 dependencyvit_lite_tiny sparsifiner_deit_small --batch-size 64 --warmup 2 \
    --reps 3 --no-plot --out-dir "$out" --tag train_step_bf16
fi

echo "# gpu_check $([ $status = 0 ] && echo passed || echo FAILED) in $(($(date +%s) - start)) s; results in $out"
[ $dry = 1 ] && rm -rf "$out"
exit $status
