#!/usr/bin/env bash
# Set up the venv, then run the self-contained demo (both tiers in a temporary folder).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh
exec .venv/bin/splitvault demo "$@"
