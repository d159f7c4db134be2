#!/usr/bin/env bash
# The one prepared GPU check, for a borrowed machine that has JAX with CUDA but no TensorFlow,
# MLflow or internet. It measures the seed recipe (ResNet-164, batch 128, 50k images) seconds per
# epoch on the JAX backend (fast path with the host and the device feed, and float32) through
# pipeline.fitting, the training code.
#
# Here, once: the wheelhouse (keras and pyyaml with their dependencies, for CPython 3.11-3.13;
# numpy and ml_dtypes come with JAX), about 25 MB, ignored by git:
#   for v in 3.11 3.12 3.13; do pip download -q --only-binary=:all: --python-version $v \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl keras==3.15.1 pyyaml==6.0.4; done
#   rm -f .whl/numpy-*
# Then through the device tool: run(command="bash bench/gpu.sh", carry=[".whl"], timeout_s=600).
# Results come back in $OUT (gpu-*.json, gpu.txt); copy them to bench/results/.
set -euo pipefail
OUT=${OUT:-bench/results}
python -m pip install -q --no-index --find-links .whl keras pyyaml
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# Most important first: each run compiles for a minute or two, and one command may last 10 minutes.
FAST="train.precision=mixed_bfloat16 train.jit_compile=true train.steps_per_execution=16"
python bench/gpu_epoch.py --epochs 3 --out "$OUT/gpu-fast.json" --overrides "$FAST"
python bench/gpu_epoch.py --epochs 3 --out "$OUT/gpu-fast-device-feed.json" --overrides "$FAST train.feed=device"
python bench/gpu_epoch.py --epochs 2 --out "$OUT/gpu-float32.json" --overrides "train.precision=float32"
