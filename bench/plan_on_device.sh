#!/bin/bash
# One device call of a plan (python -m wan_exp.plan) that may need more than one call: the plan
# runs under a time limit (SIGTERM stops its job cleanly, the same command goes on later), and
# what it wrote comes back as one file (a call returns only a few files), $OUT/<name of out>.tgz:
#   plan.md, plan.json and <strategy>_<gpus>_results.json (with <strategy>_<gpus>_plan_code_version)
#   for every job that wrote one.
# To go on in a later call on a fresh machine, put each <strategy>_<gpus>_results.json back as
# <out>/jobs/<strategy>_<gpus>/0/results.json, its code version as <out>/jobs/<strategy>_<gpus>/
# plan_code_version, and carry <out> (`restore` does that).
#
# <seconds> must leave room inside the call's own limit: a stopped plan waits for its job to end
# (seconds usually, up to 120 s when it hangs) and then the files are packed; the device's 600 s
# calls took 545 here, with room to spare only because the jobs ended at once.
#
#   device:  bash bench/plan_on_device.sh run <seconds> <plan options and overrides, out=... last>
#   here:    bash bench/plan_on_device.sh restore <fetched .tgz> <out>
# The device image lacks hydra-core/omegaconf/diffusers/av: their wheels are carried in .whl.
set -uo pipefail

case "${1:-}" in
run)
    seconds=$2; shift 2
    last="${!#}"
    if [[ $# -eq 0 || $last != out=* ]]; then
        echo "plan_on_device.sh run: give out=<dir> last (got ${last:-nothing}); its files are what comes back" >&2
        exit 2
    fi
    out="${last#out=}"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    timeout -s TERM "$seconds" python3 -m wan_exp.plan "$@"
    echo "plan exit status: $?"
    dest="$OUT/$(basename "$out")"
    mkdir -p "$dest"
    cp "$out"/plan.md "$out"/plan.json "$dest"/ 2>/dev/null
    for results in "$out"/jobs/*/0/results.json; do
        [ -f "$results" ] || continue
        job=$(basename "$(dirname "$(dirname "$results")")")
        cp "$results" "$dest/${job}_results.json"
        # the code version that ran it: without it the next run of the plan runs the job again
        cp "$out/jobs/$job/plan_code_version" "$dest/${job}_plan_code_version" 2>/dev/null
    done
    ls "$dest"
    tar czf "$dest.tgz" -C "$OUT" "$(basename "$dest")" && rm -r "$dest"
    ;;
restore)
    fetched=$(mktemp -d); out=$3
    tar xzf "$2" -C "$fetched"
    for results in "$fetched"/*/*_results.json; do
        [ -f "$results" ] || continue
        job=$(basename "$results" _results.json)
        mkdir -p "$out/jobs/$job/0"
        cp "$results" "$out/jobs/$job/0/results.json"
        version="${results%_results.json}_plan_code_version"
        [ -f "$version" ] && cp "$version" "$out/jobs/$job/plan_code_version"
        echo "kept for the next run (if its code version is today's): $out/jobs/$job"
    done
    rm -r "$fetched"
    ;;
*)
    echo "usage: $0 run <seconds> <plan arguments> out=<dir> | $0 restore <fetched .tgz> <out>" >&2
    exit 2
    ;;
esac
