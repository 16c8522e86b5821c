#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` for side-by-side figures in `sherpa bench`.
# The source comes from the llama-cpp-python sdist (which vendors llama.cpp),
# fetched by pip by package name; cmake comes from its Python package. Built
# for this CPU (GGML_NATIVE), CPU only. Everything lives under target/.
# Run from anywhere: `bash scripts/build-llama-bench.sh`; it prints the
# binary's path. Then: SHERPA_LLAMA_BENCH=<path> sherpa bench
set -euo pipefail
cd "$(dirname "$0")/.."

version=0.3.36
root=$PWD/target/llama-cpp
venv=$root/venv
src=$root/llama_cpp_python-$version/vendor/llama.cpp
bin=$root/build/bin/llama-bench

if [ ! -x "$bin" ]; then
  mkdir -p "$root"
  [ -x "$venv/bin/python" ] || python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check cmake==4.4.5 ninja==1.13.2
  if [ ! -d "$src" ]; then
    "$venv/bin/pip" download --quiet --disable-pip-version-check --no-deps \
      --no-binary=llama-cpp-python --dest "$root" "llama-cpp-python==$version"
    tar -xzf "$root/llama_cpp_python-$version.tar.gz" -C "$root"
  fi
  "$venv/bin/cmake" -S "$src" -B "$root/build" -G Ninja \
    -DCMAKE_MAKE_PROGRAM="$venv/bin/ninja" -DCMAKE_BUILD_TYPE=Release \
    -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
    -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF >/dev/null
  "$venv/bin/cmake" --build "$root/build" --target llama-bench -j "$(nproc)" >/dev/null
fi
echo "$bin"
