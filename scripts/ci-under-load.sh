#!/usr/bin/env bash
# CI's run, under load: a fresh clone of this repository's HEAD, with ../shared beside it as CI
# lays it, runs `CI=true bash .ci/run` while stress-ng keeps every core busy. Prints the exit
# status and wall time; the log is in the run's folder.
#   bash scripts/ci-under-load.sh [random]     # random: SPLITVAULT_TEST_ORDER=random
set -uo pipefail
repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
command -v stress-ng >/dev/null || { echo "ci-under-load: needs stress-ng (apt-get install stress-ng)"; exit 2; }
run=$(mktemp -d /tmp/splitvault-ci.XXXXXX)
git clone -q "$repo" "$run/repo"
[[ -d "$repo/../shared" ]] && cp -r "$repo/../shared" "$run/shared"
stress-ng --cpu "$(nproc)" --timeout 0 >/dev/null 2>&1 &
load=$!
trap 'kill "$load" 2>/dev/null' EXIT
if [[ ${1:-} == random ]]; then export SPLITVAULT_TEST_ORDER=random; fi
started=$(date +%s)
(cd "$run/repo" && CI=true bash .ci/run >"$run/log" 2>&1 </dev/null)
status=$?
echo "ci-under-load: exit $status in $(( $(date +%s) - started )) s (log: $run/log)"
exit "$status"
