#!/usr/bin/env bash
# The prepared CUDA check (issue #14): about 5 minutes on one H100/H200, results under $OUT.
#
#   bash scripts/gpu_check.sh --prepare        # here, once: .gpu/ (ignored) with the Fashion-MNIST
#                                              # files; the GPU machine has torch but not this data
#   bash scripts/gpu_check.sh                  # on the GPU machine (device tool: carry .gpu)
#   PYTHON=.venv/bin/python bash scripts/gpu_check.sh --device cpu --quick   # the CPU dry run
#
# On the GPU machine the plain python3 holds torch, torchvision, numpy, pillow, tqdm and pytest;
# vpns_core needs nothing else for these steps (torch-pruning, Ray and MLflow are not imported).
# Steps: scripts/gpu_check.py (environment; threshold by kthvalue / sort / the trial's, equal;
# 5 + 5 VPNs steps under sync-debug "error"; a 1 + 1-epoch ResNet-18 trial at 224 px with
# images/s, peak memory and exact sparsity; a CPU checkpoint resumed on the GPU), then
# benchmarks/masked_step.py at 224 px, batch 256, with and without AMP, global and ERK
# allocation, NCHW and channels_last side by side, the 2:4 masked step beside 50% unstructured,
# then the CUDA tests (pytest -m cuda).
set -uo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
OUT=${OUT:-results/gpu_check}
DEVICE=cuda
QUICK=()
PREPARE=0
for arg in "$@"; do
  case "$arg" in
    --prepare) PREPARE=1 ;;
    --quick) QUICK=(--quick) ;;
    --device) ;;
    cpu|cuda) DEVICE=$arg ;;
    *) echo "error: $arg: unknown argument; use --prepare, --device cpu|cuda, --quick" >&2; exit 2 ;;
  esac
done

if [ "$PREPARE" = 1 ]; then
  src=/usr/share/datasets/fashion-mnist
  [ -f "$src/train-images-idx3-ubyte.gz" ] || { echo "error: $src not found: run bash scripts/setup.sh first" >&2; exit 2; }
  mkdir -p .gpu/data/fashion-mnist
  cp "$src"/*-ubyte.gz .gpu/data/fashion-mnist/
  grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || echo '/.gpu/' >> .git/info/exclude
  du -sh .gpu
  exit 0
fi

DATA=()
if [ -d .gpu/data/fashion-mnist ]; then
  DATA=(--data-root .gpu/data)
  # one data root for every step: the masked-step benchmark, the no_sync step and the CUDA tests
  # read it through $VPNS_DATA_ROOT (vpns_core.data), not only gpu_check.py's flag
  export VPNS_DATA_ROOT=$PWD/.gpu/data
fi
mkdir -p "$OUT"
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
status=0
"$PYTHON" scripts/gpu_check.py --device "$DEVICE" "${QUICK[@]}" --out "$OUT" "${DATA[@]}" || status=1

if [ ${#QUICK[@]} -gt 0 ]; then
  sizes=(--sizes 32 --batch 8 --pads 2 --warmup 1 --iters 2)
else
  sizes=(--sizes 224 --batch 256 --pads 16 --warmup 3 --iters 10)
fi
for alloc in global erk; do
  for amp in "" --amp; do
    echo "== masked_step: $alloc ${amp:-fp32}"
    "$PYTHON" -m benchmarks.masked_step --device "$DEVICE" "${sizes[@]}" --allocation "$alloc" \
      --layout both --clock wall $amp --out "$OUT/masked_step_${alloc}${amp:+_amp}.json" || status=1
  done
done

echo "== masked_step: 2:4 against 50% unstructured and dense (issue 30)"
"$PYTHON" -m benchmarks.masked_step --device "$DEVICE" "${sizes[@]}" --sparsity 0.5 --pattern 2:4 \
  --variants dense stage1 stage1_nm stage2 stage2_nm --layout auto --clock wall --amp \
  --out "$OUT/masked_step_2_4.json" || status=1

echo "== CUDA tests"
if [ "$DEVICE" = cuda ]; then
  VPNS_TEST_CUDA=1 "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider \
    tests/test_cuda_path.py tests/test_data.py tests/test_masking.py 2>&1 | tee "$OUT/cuda_tests.log" || status=1
else
  echo "(no GPU: the CUDA tests are skipped in the dry run)"
fi
echo "gpu_check: exit $status; results in $OUT"
exit $status
