#!/bin/bash
# The GPU checks of issue 13, prepared for a session that is lent a GPU machine (the `run`
# tool), to fit its 15 minutes: ~2 min of tests and ~3 min of `bench` on one H100.
#   run(command="bash benchmarks/device_check.sh", timeout_s=540)
# Everything it prints also goes to $OUT/device_check.log (or /tmp without $OUT).
set -uo pipefail
cd "$(dirname "$0")/.."
out="${OUT:-/tmp}"
export PYTHONUNBUFFERED=1
{
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader || echo "no nvidia-smi"
  python -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  # the machine's own torch (a CUDA build) stays; only this package is installed, without deps
  python -m pip install -q --no-deps --no-build-isolation -e . || exit 1
  # every test that needs a GPU, and the CPU tests of the code they share
  python -m pytest -q -p no:cacheprovider -rs tests/test_device.py tests/test_checkpoint.py \
      tests/test_sparse_runtime.py tests/test_attach.py -k "cuda or device or lottery or runtime"
  moduli-transform bench --device cuda --hidden 4096 --batch 1 16 --sparsity 0.9 0.98 --pattern random \
      --libraries torch_rnn dense_loop torch_csr ours ours_tiled --rounds 2 --out "$out/bench-cuda"
} 2>&1 | tee "$out/device_check.log"
