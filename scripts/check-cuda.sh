#!/usr/bin/env bash
# Build-checks the `cuda` feature on a machine with no GPU and no CUDA install.
# NVIDIA's CUDA 13 wheels from PyPI supply nvcc, the headers and the libraries;
# nothing here needs a GPU, it only proves that the code and kernels compile
# and link. Run from the repository root: `bash scripts/check-cuda.sh`.
# Everything it installs lives under target/, so `cargo clean` removes it.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=$PWD/target/cuda-venv
tk=$PWD/target/cuda-toolkit

# CUDA 13.4 is the newest release cudarc 0.19 knows; it refuses a newer nvcc.
# These pins are the set NVIDIA's own `cuda-toolkit==13.4.3` metapackage names.
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
"$venv/bin/pip" install --quiet --disable-pip-version-check \
  nvidia-cuda-nvcc==13.4.92 nvidia-cuda-crt==13.4.92 nvidia-nvvm==13.4.92 \
  nvidia-cuda-runtime==13.4.92 nvidia-cuda-cccl==13.3.4.3.1 \
  nvidia-cuda-nvrtc==13.4.92 nvidia-cublas==13.8.0.4 nvidia-curand==10.4.4.72

# The CUDA 13 wheels all unpack into one nvidia/cu13 folder laid out like a
# toolkit (bin/nvcc, include/, lib/, nvvm/), but ship only versioned library
# names (libcudart.so.13) where the linker asks for libcudart.so.
cu13=$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/nvidia/cu13
mkdir -p "$tk/lib/stubs"
for d in bin include nvvm; do ln -sfn "$cu13/$d" "$tk/$d"; done
for f in "$cu13"/lib/lib*.so.*; do
  name=$(basename "$f")
  ln -sfn "$f" "$tk/lib/$name"
  ln -sfn "$name" "$tk/lib/${name%%.so.*}.so"
done

# The binary links the driver library (-lcuda), which comes with the GPU driver
# and is on no package index. Like the toolkit's own lib/stubs/libcuda.so, this
# one only satisfies the linker: every entry point returns
# CUDA_ERROR_STUB_LIBRARY (34), and at run time the real libcuda.so.1 is found
# by its soname instead. cudarc searches lib/stubs under CUDA_ROOT by itself.
if [ ! -e "$tk/lib/stubs/libcuda.so" ]; then
  grep -ohE '\bcu[A-Z][A-Za-z0-9_]*\b' "$tk/include/cuda.h" | sort -u |
    sed 's/.*/int &(void) { return 34; }/' > "$tk/lib/stubs/libcuda-stub.c"
  cc -shared -fPIC -Wl,-soname,libcuda.so.1 \
    -o "$tk/lib/stubs/libcuda.so" "$tk/lib/stubs/libcuda-stub.c"
fi

# cudarc takes its link paths from CUDA_ROOT and the CUDA version from
# `nvcc --version` on PATH; candle-kernels finds nvcc on PATH too. With no
# nvidia-smi the kernels' target GPU must be named: 80 is Ampere, the oldest
# that compiles candle's bf16 kernels.
export CUDA_ROOT=$tk
export PATH=$tk/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-80}
# Kept apart from the CPU build so neither overwrites the other's binaries.
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$PWD/target/cuda}

cargo build --features cuda
cargo build --features cli,cuda
