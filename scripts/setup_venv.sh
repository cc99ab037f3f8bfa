#!/usr/bin/env bash
# Creates (or reuses) .venv/ at the repo root and installs the project with the CPU stack:
# torch 2.13.0 (CPU), fbgemm-gpu-cpu 1.8.0, torchrec 1.8.0, triton 3.7.1, torchx 0.7.0, pytest.
# Idempotent: a second run only checks that the install is current (a stamp of the inputs).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
shim=packaging/fbgemm-gpu-cpu-shim
[ -x .venv/bin/python ] || python3 -m venv .venv
stamp=.venv/.recblr-install-stamp
want=$(cat pyproject.toml "$shim/pyproject.toml" | sha256sum | cut -c1-16)
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  # One resolver run: the shim provides the name `fbgemm-gpu` that torchrec asks for.
  .venv/bin/python -m pip install --disable-pip-version-check -q "./$shim" -e ".[cpu,dev]"
  echo "$want" > "$stamp"
fi
# Guard against the trap this install avoids: the CUDA fbgemm-gpu over the CPU one.
.venv/bin/python - <<'PY'
import importlib.metadata as md
files = [str(f) for f in (md.files("fbgemm-gpu") or [])]
assert not any(f.startswith("fbgemm_gpu/") for f in files), "the CUDA fbgemm-gpu is installed; rm -rf .venv and rerun"
PY
