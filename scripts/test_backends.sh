#!/usr/bin/env bash
# Runs pytest once per Keras backend, JOBS backends at a time (one core
# each, OMP_NUM_THREADS=1), in the order given: list the longest first, so
# that the shorter ones share the other job (measured, `-m "not slow"`, 2
# jobs on 2 shared cores: jax 640 s, torch 340 s, tensorflow 320 s, so
# "jax torch tensorflow" takes max(jax, torch + tensorflow), about 11 min).
# Each backend's output is printed whole when it finishes, with its wall
# time; the exit status is non-zero if any backend failed (pytest's 5, "no
# tests ran", included).
#
#   BIN=.venv/bin BACKENDS="jax torch tensorflow" JOBS=2 \
#       scripts/test_backends.sh -m "not slow"
set -u
bin=${BIN:-.venv/bin}
jobs=${JOBS:-2}
read -r -a backends <<< "${BACKENDS:-jax torch tensorflow}"
logs=$(mktemp -d)
trap 'rm -rf "$logs"' EXIT
declare -A pids=() started=()
status=0

finish() {  # waits for any one backend, prints its log, records failure
    local done_pid rc backend
    wait -n -p done_pid
    rc=$?
    for backend in "${!pids[@]}"; do
        if [[ ${pids[$backend]} == "$done_pid" ]]; then
            echo "=== pytest under KERAS_BACKEND=$backend (exit $rc," \
                "$((SECONDS - started[$backend])) s) ==="
            cat "$logs/$backend.log"
            unset "pids[$backend]"
        fi
    done
    if [[ $rc != 0 ]]; then status=1; fi
}

for backend in "${backends[@]}"; do
    while (( ${#pids[@]} >= jobs )); do finish; done
    KERAS_BACKEND=$backend OMP_NUM_THREADS=${OMP_NUM_THREADS:-1} \
        "$bin/python" -m pytest -p no:cacheprovider \
        --basetemp="$logs/tmp-$backend" "$@" \
        > "$logs/$backend.log" 2>&1 &
    pids[$backend]=$!
    started[$backend]=$SECONDS
done
while (( ${#pids[@]} > 0 )); do finish; done
exit $status
