#!/usr/bin/env bash
# Lint, type-check and test. Arguments go to pytest (default: tests sdk/tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# System tools some tests use; installed only when missing and only when we may (root).
declare -A needs=([redis-server]=redis-server [docker-compose]=docker-compose [ip]=iproute2)
missing=()
for cmd in "${!needs[@]}"; do
    command -v "$cmd" >/dev/null 2>&1 || missing+=("${needs[$cmd]}")
done
if ((${#missing[@]} > 0)); then
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test: installing ${missing[*]}" >&2
        export DEBIAN_FRONTEND=noninteractive
        apt-get update -qq
        apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
    else
        echo "test: missing ${missing[*]} (not root; tests that need them will skip)" >&2
    fi
fi

.venv/bin/ruff check .
.venv/bin/mypy .
if (($# == 0)); then
    set -- tests sdk/tests
fi
exec .venv/bin/python -m pytest "$@"
