#!/usr/bin/env bash
# GPU check for a machine that may have JAX or PyTorch but no TensorFlow and no network; prints JSON.
#
#   benchmarks/gpu_check.sh [--wheels DIR] [--quick] [--size N] [--json OUT.json]
#
# Runs benchmarks/gpu_check.py from this checkout (no install of l2l-scale itself, so its TensorFlow dependency
# is never needed). The backend is KERAS_BACKEND if set, else jax, torch or tensorflow, whichever is importable.
# --wheels DIR: first install the missing runtime packages (keras, dask, zarr, ...) from DIR into a virtual
# environment that sees the system's packages (pip --no-index: nothing is downloaded): l2l-scale's dependencies
# from pyproject.toml without tensorflow and csbdeep. Build DIR elsewhere with pip download -d DIR on that list
# (plus jax[cuda12] or torch if the node has neither).
# --quick runs on a CPU in about a minute (CI); the full run (8192^2 image) fits in 5 minutes on a GPU.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
wheels=""
args=()
while [ $# -gt 0 ]; do
  case "$1" in
    --wheels) wheels="${2:?--wheels needs a folder}"; shift 2 ;;
    --wheels=*) wheels="${1#--wheels=}"; shift ;;
    *) args+=("$1"); shift ;;
  esac
done
if [ -n "$wheels" ]; then
  # l2l-scale's own dependencies from pyproject.toml, less TensorFlow and CSBDeep (training only)
  mapfile -t runtime < <("$python" - "$root/pyproject.toml" <<'PY'
import re, sys
try:
    import tomllib
except ImportError:  # Python 3.10
    import tomli as tomllib
with open(sys.argv[1], "rb") as f:
    for dep in tomllib.load(f)["project"]["dependencies"]:
        if re.match(r"[A-Za-z0-9_.-]+", dep).group(0).lower() not in ("tensorflow", "csbdeep"):
            print(dep)
PY
)
  [ -d "$wheels" ] || { echo "gpu_check.sh: error: wheel folder $wheels not found; pass --wheels DIR" >&2; exit 2; }
  venv="${GPU_CHECK_VENV:-${TMPDIR:-/tmp}/l2l_gpu_check_venv}"
  [ -x "$venv/bin/python" ] || "$python" -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install --quiet --no-index --find-links "$wheels" "${runtime[@]}" >&2
  python="$venv/bin/python"
fi
if [ -z "${KERAS_BACKEND:-}" ]; then
  for candidate in jax torch tensorflow; do
    if "$python" -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('$candidate') is None)"; then
      export KERAS_BACKEND="$candidate"; break
    fi
  done
fi
exec "$python" "$root/benchmarks/gpu_check.py" ${args[@]+"${args[@]}"}
