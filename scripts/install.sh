#!/usr/bin/env bash
# Creates the project venv and installs the pinned CPU stack plus terarec (editable).
# Usage: scripts/install.sh [python] [venv-dir]
set -euo pipefail
PY=${1:-python3}
VENV=${2:-.venv}
TORCH_VERSION=${TERAREC_TORCH_VERSION:-2.13.0}
TORCHREC_VERSION=${TERAREC_TORCHREC_VERSION:-1.8.0}

# Open MPI for mpi4py and `mpirun` (Debian); skipped when already present or not root.
if ! command -v mpicc >/dev/null 2>&1; then
  if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "[install] apt-get install openmpi-bin libopenmpi-dev"
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
      openmpi-bin libopenmpi-dev >/dev/null) || echo "[install] WARNING: Open MPI install failed; mpi4py/mpirun tests will skip"
  else
    echo "[install] WARNING: no mpicc and cannot apt-get; mpi4py/mpirun tests will skip"
  fi
fi

if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
VPY="$VENV/bin/python"
"$VPY" -m pip install -q --upgrade pip
# torch alone first: with the CPU wheel installed, later ranges are already satisfied.
"$VPY" -m pip install -q "torch==${TORCH_VERSION}"
"$VPY" -m pip install -q -r requirements-cpu.txt || {
  # mpi4py needs Open MPI headers; the rest of terarec works without it.
  echo "[install] retrying without mpi4py"
  grep -v '^mpi4py' requirements-cpu.txt > "$VENV/req-nompi.txt"
  "$VPY" -m pip install -q -r "$VENV/req-nompi.txt"
}
"$VPY" -m pip install -q --no-deps "torchrec==${TORCHREC_VERSION}"
"$VPY" -m pip install -q --no-deps -e .
"$VPY" - <<'PY'
import torch, torchrec, fbgemm_gpu  # noqa: F401
assert not torch.cuda.is_available() or torch.version.cuda, "unexpected torch build"
print(f"[install] torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec,'__version__') else '?'} ok")
PY
