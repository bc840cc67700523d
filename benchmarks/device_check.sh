#!/usr/bin/env bash
# The GPU checks of one lent device session (the `device` tool): CUDA-graph updates checked
# against the eager loop, then timed. Wheels for what the machine lacks (Ray, RLlib's needs,
# pydantic) travel in .whl (benchmarks/README.md, "On a GPU").
# Usage: [E2E=1] bash benchmarks/device_check.sh [BATCH...]
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, ray, platform; print('torch', torch.__version__, 'ray', ray.__version__, 'python', platform.python_version(), 'cpus', torch.get_num_threads())"
timeout 240 python3 -m pytest -q -p no:cacheprovider tests/test_captured_update.py tests/test_device_replay.py 2>&1 | tail -25 | tee "$OUT/tests.log"
timeout 120 python3 -m benchmarks.gpu_update_profile --channels-last 2>&1 | grep -v -i warn | tee "$OUT/profile_256.log"
batches=("$@"); [ ${#batches[@]} -gt 0 ] || batches=(256 1024)
tuning=--cuda-tuning  # the backend settings tried at the first batch only (device time)
for batch in "${batches[@]}"; do
  timeout 300 python3 -m benchmarks.cnn_learner --devices cuda --batch-size "$batch" --updates-per-call 32 --calls 12 $tuning 2>&1 \
    | grep -v -i "warn" | tee "$OUT/cnn_learner_$batch.log"
  cp benchmarks/results/cnn_learner.json "$OUT/cnn_learner_$batch.json"
  tuning=
done
# End to end (E2E=1): 8 stand-in servers feeding the learner actor on the GPU, one update per env step.
if [ "${E2E:-0}" = 1 ]; then
  timeout 420 python3 -m benchmarks.async_sampling --runners 8 --ratio 1.0 --learner gpu --iters 16 --warmup 6 2>&1 \
    | grep -v -i "warn" | tail -20 | tee "$OUT/async_8_servers.log"
  cp benchmarks/results/async_sampling.json "$OUT/async_8_servers.json"
fi
