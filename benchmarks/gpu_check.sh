#!/usr/bin/env bash
# The GPU check of pyro-softmix, in one command (under 8 minutes on one NVIDIA H100/H200):
# the CUDA tests, CPU/GPU agreement of a fit, one EM iteration against its bandwidth and
# matrix-product floors, and a default fit of p = 10^6, L = 1,024, K = 16.
#
# It needs Python with torch and CUDA; pyro-ppl and pyro-api (pure-Python wheels) are installed
# from .whl/ when that folder exists. To prepare them on a machine with network access:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl pyro-ppl==1.9.2 pyro-api==0.1.2  (the device image has the rest)
# Results: $OUT (default gpu_check_out/): gpu.txt, cuda_tests.txt, gpu_check.txt, gpu_check.json.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_check_out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || exit 1
    export PYTHONPATH="/tmp/site:$PYTHONPATH"
fi
start=$(date +%s)
{ nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
  python3 -c "import torch, pyro; print('torch', torch.__version__, 'pyro', pyro.__version__, 'cuda', torch.cuda.is_available())"
} | tee "$OUT/gpu.txt"
echo "== CUDA tests"
timeout 150 python3 -m pytest -q -p no:cacheprovider -k "cuda" tests/test_em.py tests/test_gpu.py \
    2>&1 | tee "$OUT/cuda_tests.txt"
echo "== gpu_check.py"
timeout 330 python3 benchmarks/gpu_check.py --json "$OUT/gpu_check.json" "$@" 2>&1 | tee "$OUT/gpu_check.txt"
status=${PIPESTATUS[0]}
echo "gpu_check.sh took $(( $(date +%s) - start )) s (status $status)"
exit "$status"
