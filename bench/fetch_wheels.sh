#!/usr/bin/env bash
# Fills .whl/ (git-ignored) with the wheels bench/device_check.sh installs on the lent GPU machine, whose image has
# Python 3.12, torch, triton, transformers, nvcc and the build tools but no network. Run it here, where PyPI is
# reachable, then name ".whl" in the run tool's carry list (64 MiB in all: this list is ~16 MiB).
#
#     bash bench/fetch_wheels.sh [PYTHON_VERSION]      # default 3.12, the image's
#
# --no-deps and an explicit list: the image's own torch, numpy and huggingface_hub stay as they are (a resolver
# would fetch a CUDA torch of several GB).
#   pytest iniconfig pluggy packaging pygments   the gpu tests (pytest -m gpu)
#   pillow tqdm pyyaml                           kclip's own imports (images, progress, run configs)
#   open_clip_torch ftfy wcwidth regex timm safetensors   models, tokenizer, bench_train / bench_eval
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
py=${1:-3.12}
mkdir -p .whl
python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$py" --implementation cp \
  --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 -d .whl \
  pytest iniconfig pluggy packaging pygments pillow tqdm pyyaml \
  open_clip_torch ftfy wcwidth regex timm safetensors
du -sh .whl
ls .whl
