#!/bin/bash
# An offline GPU host's whole check, in one go: install clustersim from a folder of wheels
# beside the host's own CuPy (no index), run the GPU tests, then make validate-gpu's suite.
#   make wheelhouse WHEEL_PYTHON=3.12        # on a connected machine; copy wheelhouse/ over
#   bash scenarios/validation/gpu_host.sh wheelhouse   # on the GPU host, in the checkout
# The folder needs the clustersim wheel and whatever the host lacks (simpy, mpich, mpi4py);
# packages the host already has (NumPy, CuPy) are kept.  Logs and the suite's JSON go to
# out/gpu-host/; exit 1 when a test or a case failed.  PYTHON picks the interpreter
# (default python3).
set -u -o pipefail
WHEELS=${1:?usage: gpu_host.sh WHEEL_FOLDER}
PY=${PYTHON:-python3}
LOG=out/gpu-host
mkdir -p "$LOG"
export PYTHONUNBUFFERED=1
# this folder's mpi4py where it has one: it is the build that loads the mpich wheel's MPI
MPI4PY=$(ls "$WHEELS"/mpi4py-*.whl 2>/dev/null | head -n 1)
"$PY" -m pip install -q --no-index --find-links "$WHEELS" clustersim $MPI4PY || exit 2
"$PY" - <<'PY' 2>&1 | tee "$LOG/versions.txt"
import platform
from mpi4py import MPI
print("python", platform.python_version(), "| MPI", MPI.Get_library_version().splitlines()[0].strip())
try:
    import cupy
    print("cupy", cupy.__version__, "| GPUs", cupy.cuda.runtime.getDeviceCount(),
          "| CUDA runtime", cupy.cuda.runtime.runtimeGetVersion())
    from cupy.cuda import nccl
    print("nccl", nccl.get_version())
except Exception as exc:
    print("cupy/nccl:", type(exc).__name__, exc)
PY
status=0
if "$PY" -c "import pytest, hypothesis" 2>/dev/null; then
    "$PY" -m pytest -q -rs -p no:cacheprovider tests/test_gpu_executor.py tests/test_gpucal.py \
        tests/test_kernels.py tests/test_nccl_transport.py tests/test_gpu_suite.py 2>&1 | tee "$LOG/tests.txt" || status=1
else
    echo "pytest or hypothesis missing on this host: GPU tests not run" | tee "$LOG/tests.txt"
fi
"$PY" scenarios/validation/gpu.py 2>&1 | tee "$LOG/validate.txt" || status=1
cp out/validation-gpu.json out/calibration/gpus.toml "$LOG/" 2>/dev/null
echo "logs in $LOG/"
exit $status
