#!/usr/bin/env bash
# Lint, type-check and test. Arguments go to pytest (default: tests sdk/tests).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

bash scripts/setup.sh

# System tools some tests use; installed only when missing and only when we may (root).
declare -A needs=(
    [redis-server]=redis-server [docker-compose]=docker-compose [ip]=iproute2 [unshare]=util-linux
    [initdb]=postgresql  # three public replicas on one PostgreSQL
    [chromium]=chromium [pdftotext]=poppler-utils  # the evidence report rendered headless
)
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

# Tests never reach past this machine. Every Python process they start imports the connect
# guard (loopback only); when root, the suite also runs in a network namespace of its own whose
# only interface is lo, which holds gRPC's native core, redis-server and every other program.
export PYTHONPATH="$PWD/tests/support/netguard${PYTHONPATH:+:$PYTHONPATH}"
isolated() {
    if [[ $(id -u) -eq 0 ]] && unshare --net true 2>/dev/null; then
        SPLITVAULT_TEST_NETNS=1 unshare --net -- bash -c 'ip link set lo up && exec "$@"' _ "$@"
    else
        echo "test: no network namespace (not root, or unshare refused): only the connect" \
            "guard keeps Python test processes on loopback" >&2
        SPLITVAULT_TEST_NETNS=guard "$@"
    fi
}
# Test order: fixed unless SPLITVAULT_TEST_ORDER=random (pytest-randomly; the seed is printed).
order=(-p no:randomly)
if [[ ${SPLITVAULT_TEST_ORDER:-} == random ]]; then
    order=(-p randomly)
fi
pytest=(.venv/bin/python -m pytest "${order[@]}" --durations=15)
if (($# > 0)); then
    isolated "${pytest[@]}" "$@"
    exit
fi
# First the tests that need a Docker engine: its containers and published ports live in the
# host's network namespace (exit 5: none selected). Then the rest, isolated.
SPLITVAULT_TEST_NETNS=host "${pytest[@]}" -m docker tests || [[ $? -eq 5 ]]
isolated "${pytest[@]}" -m "not docker" tests sdk/tests
