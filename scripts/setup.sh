#!/usr/bin/env bash
# Create (or refresh) the development venv in .venv. Safe to run again.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

TORCH_SPEC="torch==2.13.0"
# Set SPLITVAULT_TORCH_INDEX=https://download.pytorch.org/whl/cpu where PyPI would give a CUDA build.
torch_index=()
if [[ -n "${SPLITVAULT_TORCH_INDEX:-}" ]]; then
    torch_index=(--index-url "$SPLITVAULT_TORCH_INDEX")
fi

if [[ ! -x .venv/bin/python ]]; then
    echo "setup: creating .venv" >&2
    python3 -m venv .venv
fi
pip=(.venv/bin/python -m pip --disable-pip-version-check --quiet)

"${pip[@]}" install --upgrade pip
# torch first, pinned, so no later dependency can resolve a different (CUDA) build.
"${pip[@]}" install "${torch_index[@]}" "$TORCH_SPEC"
"${pip[@]}" install -e '.[dev,demo]' -e ./sdk
echo "setup: .venv ready ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))" >&2
