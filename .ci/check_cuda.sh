#!/usr/bin/env bash
# Compile-check every CUDA kernel file (compile only; nothing runs here), so a broken kernel cannot land.
# The .cu files are plain CUDA (no torch headers), which keeps this fast.
set -euo pipefail
cd "$(dirname "$0")/.."
shopt -s nullglob globstar
files=(csrc/**/*.cu)
if ! command -v nvcc >/dev/null; then
  echo "check_cuda: nvcc not found" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
for f in "${files[@]}"; do
  echo "nvcc -c $f"
  nvcc -std=c++17 -O2 -Icsrc -gencode arch=compute_80,code=sm_80 -gencode arch=compute_90,code=sm_90 \
    -Xcompiler -Wall -c "$f" -o "$tmp/$(basename "$f").o"
done
echo "check_cuda: ${#files[@]} file(s) compiled"
