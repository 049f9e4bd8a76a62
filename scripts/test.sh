#!/usr/bin/env bash
# The test command: Rust tests of the whole workspace, including the checks that run Python
# packages against kiem (`tokenizers`; the `openai` client and Selenium against `kiem serve`),
# installed into .venv on first use. The chat page's browser test runs when Debian's chromium
# and chromium-driver are installed (.ci/run installs them and sets KIEM_REQUIRE_BROWSER).
# Every step runs even when an earlier one fails; a summary at the end says what failed.
set -uo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import tokenizers, tiktoken, openai, selenium, gguf" 2>/dev/null; then
  echo "setting up .venv with requirements-dev.txt ..."
  python3 -m venv .venv
  .venv/bin/pip install --quiet --disable-pip-version-check -r requirements-dev.txt \
    || { echo "cannot install requirements-dev.txt into .venv"; exit 1; }
fi
export KIEM_PYTHON="$PWD/.venv/bin/python"

log=$(mktemp)
trap 'rm -f "$log"' EXIT
failed_steps=()
step() {
  local name=$1
  shift
  echo "==> $name: $*"
  "$@" 2>&1 | tee -a "$log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || failed_steps+=("$name")
}

step "workspace" cargo test --workspace --locked --no-fail-fast "$@"
# The engine's fp32 products run on kiem's own GEMM; check the OpenBLAS path (KIEM_BLAS=openblas,
# used when the system has it) against the same finite-difference and PyTorch tests too.
step "engine, OpenBLAS" env KIEM_BLAS=openblas cargo test --locked --no-fail-fast -p kiem-engine "$@"
# Kernels run compiled for AVX-512 or AVX2 when the CPU has them; check their baseline x86-64
# code too, and the bf16 products through their scalar emulation (so the bf16 path is tested
# on CPUs without AVX512-BF16, and the emulation against the model tests on CPUs with it).
step "engine, baseline SIMD, emulated bf16" env KIEM_SIMD=baseline KIEM_BF16=emulate \
  cargo test --locked --no-fail-fast -p kiem-engine "$@"
# Data-parallel jobs under mpirun (the `mpi` feature) where Open MPI is installed; .ci/run
# installs it and sets KIEM_REQUIRE_MPI so the step cannot be skipped there.
if command -v mpirun >/dev/null && pkg-config --exists ompi 2>/dev/null; then
  step "MPI jobs" cargo test --locked --no-fail-fast -p kiem --features mpi --test mpi "$@"
elif [ "${KIEM_REQUIRE_MPI:-0}" = 1 ]; then
  echo "KIEM_REQUIRE_MPI is set but Open MPI (mpirun, pkg-config ompi) is missing"
  failed_steps+=("MPI jobs")
else
  echo "==> MPI jobs: skipped (install libopenmpi-dev, openmpi-bin and libclang-dev to run them)"
fi

echo
echo "==> summary"
awk '/^test result:/ { passed += $4; failed += $6; ignored += $8 }
     END { printf "%d tests passed, %d failed, %d ignored\n", passed, failed, ignored }' "$log"
if [ ${#failed_steps[@]} -eq 0 ]; then
  echo "all steps passed"
  exit 0
fi
echo "failed steps: ${failed_steps[*]}"
echo "failed tests:"
grep -E '^test .* \.\.\. FAILED$' "$log" | sed 's/^test /  /; s/ \.\.\. FAILED$//' | sort -u
grep -E '^error: (could not compile|test failed|[0-9]+ targets? failed)' "$log" | sort -u | sed 's/^/  /'
exit 1
