#!/usr/bin/env bash
# Syntax-check the CUDA extension's torch binding (csrc/bind_cuda.cpp and the headers it includes)
# against the installed torch's headers. A CPU torch wheel lacks one cmake-generated CUDA header,
# so an empty stand-in is supplied; nothing is linked or run. Usage: check_cuda_bindings.sh PYTHON
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python3}
stub=$(mktemp -d)
trap 'rm -rf "$stub"' EXIT
mkdir -p "$stub/c10/cuda/impl"
echo '#pragma once' >"$stub/c10/cuda/impl/cuda_cmake_macros.h"
torch_inc=$("$py" -c "import torch.utils.cpp_extension as c; print(' '.join('-I' + p for p in c.include_paths()))")
py_inc=$("$py" -c "import sysconfig; print(sysconfig.get_paths()['include'])")
cuda_inc=$(dirname "$(readlink -f "$(command -v nvcc)")")/../include
# shellcheck disable=SC2086
g++ -std=c++17 -fsyntax-only -I"$stub" $torch_inc -I"$py_inc" -I/usr/local/cuda/include -I"$cuda_inc" -Icsrc \
  -DTORCH_EXTENSION_NAME=_C_cuda csrc/bind_cuda.cpp
echo "check_cuda_bindings: csrc/bind_cuda.cpp parses"
