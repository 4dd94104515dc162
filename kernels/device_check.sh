#!/usr/bin/env bash
# GPU check for the Triton kernels, for a lent GPU machine (no network there; installs nothing).
# Runs the kernel tests on CUDA, then `turbo bench kernels`, and writes everything to one
# folder (default $OUT, else ./device-check): pytest log, kernels.json, kernels.md.
# Needs python3 with torch, triton, numpy, tabulate and pytest (the GPU image has them);
# the project is used from this checkout through PYTHONPATH, not installed.
# Target: under 8 minutes on an H100/H200.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${OUT:-$root/device-check}"
mkdir -p "$out"
export PYTHONPATH="$root:$root/kernels${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
cd "$root"
python3 - <<'PY' | tee "$out/env.txt"
import torch, triton
print("torch", torch.__version__, "triton", triton.__version__,
      "cuda", torch.cuda.is_available() and torch.cuda.get_device_name(0))
PY
status=0
timeout 240 python3 -m pytest kernels/tests -q -p no:cacheprovider -o addopts="" \
    2>&1 | tee "$out/pytest.log" || status=$?
timeout 300 python3 -m turbo_core.cli bench kernels --json "$out/kernels.json" \
    --markdown "$out/kernels.md" 2>&1 | tee "$out/bench.log" || status=$?
echo "device check finished with status $status; results in $out"
exit "$status"
