#!/usr/bin/env bash
# The test command: Rust tests of the whole workspace, including the checks that run Python
# packages against kiem (`tokenizers`; the `openai` client and Selenium against `kiem serve`),
# installed into .venv on first use. The chat page's browser test runs when Debian's chromium
# and chromium-driver are installed (.ci/run installs them and sets KIEM_REQUIRE_BROWSER).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import tokenizers, tiktoken, openai, selenium" 2>/dev/null; then
  echo "setting up .venv with requirements-dev.txt ..."
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt
fi
export KIEM_PYTHON="$PWD/.venv/bin/python"
cargo test --workspace --locked "$@"
# The engine's matmuls run on the system OpenBLAS when it is installed; check the built-in
# `gemm` path against the same finite-difference and PyTorch tests too.
KIEM_BLAS=gemm cargo test --locked -p kiem-engine "$@"
# Element-wise kernels run compiled for AVX-512 or AVX2 when the CPU has them; check the
# baseline x86-64 build of them too.
KIEM_SIMD=baseline cargo test --locked -p kiem-engine "$@"
