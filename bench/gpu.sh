#!/usr/bin/env bash
# The one prepared GPU check, for a borrowed machine that has JAX with CUDA but no TensorFlow,
# MLflow or internet. Through pipeline.fitting (the training code) on the JAX backend it measures:
#   1. params/fast.yaml, its whole schedule on the real images: fit seconds and test_acc (all 10,000);
#   2. params/improved.yaml (ResNet-164 with the tricks): seconds per epoch, projected 150 epochs;
#   3. the seed recipe (params/default.yaml): seconds per epoch, projected 150 epochs.
#
# Here, once: the wheelhouse (keras, pyyaml and pillow with their dependencies, for CPython 3.11-3.13;
# numpy and ml_dtypes come with JAX), about 30 MB, and the JPEG copy of CIFAR-10 (20 MB), both ignored by git:
#   for v in 3.11 3.12 3.13; do pip download -q --only-binary=:all: --python-version $v \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl keras==3.15.1 pyyaml==6.0.4 \
#     pillow==13.0.0; done
#   rm -f .whl/numpy-*; mkdir -p .data && cp ../shared/datasets/cifar10-jpeg-q75.tar.gz .data/
# Then through the device tool: run(command="bash bench/gpu.sh", carry=[".whl", ".data"], timeout_s=600).
# Results come back in $OUT (gpu-*.json, gpu.txt); copy them to bench/results/.
set -euo pipefail
OUT=${OUT:-bench/results}
DATA=${DATA:-.data/cifar10-jpeg-q75.tar.gz}
python -m pip install -q --no-index --find-links .whl keras pyyaml pillow
export KERAS_BACKEND=jax PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=2
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$OUT/gpu.txt"
python -c "import jax; print('jax', jax.__version__, jax.devices())" | tee -a "$OUT/gpu.txt"
# Most important first: each run compiles for a minute or two, and one command may last 10 minutes.
python -m bench.gpu_epoch --full --params params/fast.yaml --data "$DATA" --out "$OUT/gpu-fast.json" \
  --overrides "train.feed=device"
python -m bench.gpu_epoch --epochs 3 --params params/improved.yaml --data "$DATA" --out "$OUT/gpu-improved.json" \
  --overrides "train.feed=device train.steps_per_execution=16"
python -m bench.gpu_epoch --epochs 2 --params params/default.yaml --data "$DATA" --out "$OUT/gpu-seed.json"
