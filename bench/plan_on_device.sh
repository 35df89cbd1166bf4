#!/bin/bash
# One device call of a plan (python -m wan_exp.plan) that may need more than one call: the plan
# runs under a time limit (SIGTERM stops its job cleanly, the same command goes on later), and
# what it wrote comes back as one file (a call returns only a few files), $OUT/<name of out>.tgz:
#   plan.md, plan.json and <strategy>_<gpus>_results.json for every job that wrote one.
# To go on in a later call on a fresh machine, put each <strategy>_<gpus>_results.json back as
# <out>/jobs/<strategy>_<gpus>/0/results.json here and carry <out> (`restore` does that).
#
#   device:  bash bench/plan_on_device.sh run <seconds> <plan options and overrides, out=... last>
#   here:    bash bench/plan_on_device.sh restore <fetched .tgz> <out>
# The device image lacks hydra-core/omegaconf/diffusers/av: their wheels are carried in .whl.
set -uo pipefail

case "${1:-}" in
run)
    seconds=$2; shift 2
    out="${!#}"; out="${out#out=}"
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
    timeout -s TERM "$seconds" python3 -m wan_exp.plan "$@"
    echo "plan exit status: $?"
    dest="$OUT/$(basename "$out")"
    mkdir -p "$dest"
    cp "$out"/plan.md "$out"/plan.json "$dest"/ 2>/dev/null
    for results in "$out"/jobs/*/0/results.json; do
        [ -f "$results" ] && cp "$results" "$dest/$(basename "$(dirname "$(dirname "$results")")")_results.json"
    done
    ls "$dest"
    tar czf "$dest.tgz" -C "$OUT" "$(basename "$dest")" && rm -r "$dest"
    ;;
restore)
    fetched=$(mktemp -d); out=$3
    tar xzf "$2" -C "$fetched"
    for results in "$fetched"/*/*_results.json; do
        job=$(basename "$results" _results.json)
        mkdir -p "$out/jobs/$job/0"
        cp "$results" "$out/jobs/$job/0/results.json"
    done
    ;;
*)
    echo "usage: $0 run <seconds> <plan arguments> out=<dir> | $0 restore <fetched .tgz> <out>" >&2
    exit 2
    ;;
esac
