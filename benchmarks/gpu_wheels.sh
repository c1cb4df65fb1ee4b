#!/usr/bin/env bash
# Wheels of edgelm's run-time dependencies that the GPU machine's image lacks (it has torch,
# triton, numpy, tokenizers, safetensors, jinja2, click, tqdm, transformers, pytest, ...; it
# has no network). Downloads them here into .whl/ (git-ignored) for benchmarks/gpu_check.sh.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >>.git/info/exclude
py="${PYTHON:-python3}"
plat=()
for p in manylinux_2_39_x86_64 manylinux_2_35_x86_64 manylinux_2_34_x86_64 manylinux_2_31_x86_64 manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_24_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 \
         manylinux1_x86_64; do plat+=(--platform "$p"); done
"$py" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" -d .whl \
  gguf platformdirs "llguidance>=1.9,<2" starlette uvicorn prompt_toolkit wcwidth prometheus_client
ls -la .whl
