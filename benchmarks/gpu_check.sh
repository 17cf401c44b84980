#!/usr/bin/env bash
# The GPU check of issue 15 as one script, for a session lent a GPU machine (see docs/gpu.md):
#   here, once:  ../shared/tools/gpu-wheels/make-wheels           (Ray for that machine, into .whl/)
#   there:       bash benchmarks/gpu_check.sh                        (device tool: carry .whl, timeout ~560 s)
# It runs tests/test_cuda.py's GPU tests, then python -m benchmarks.cuda; logs and cuda.json land in $OUT
# (copy cuda.json to benchmarks/results/ here). Each part has its own time limit, so a hang loses only that part.
set -u
OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
if [ -d .whl ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site:$PWD || exit 1
fi
export RAY_USAGE_STATS_ENABLED=0 PYTHONUNBUFFERED=1
nvidia-smi > "$OUT/nvidia-smi.txt" 2>&1
python3 -c "import torch, ray; print(torch.__version__, torch.cuda.get_device_name(), ray.__version__)" | tee "$OUT/versions.txt"
timeout 200 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_cuda.py 2>&1 | tail -40 | tee "$OUT/test_cuda.log"
timeout 320 python3 -m benchmarks.cuda --out "$OUT/cuda.json" 2>&1 | grep -v USDT | tee "$OUT/cuda.log"
