#!/usr/bin/env bash
# Upstream's generate.py beside wan-exp's generate workload on this machine's GPUs
# (docs/upstream.md "GPU runs"). Needs a Wan2.2 checkout whose requirements are installed in
# this venv, ffmpeg on PATH, and ~45 GiB free for the random-weight folder (written once).
#   bench/upstream_vs_generate.sh <Wan2.2 checkout> <folder for the random weights> [GPUs]
set -euo pipefail
repo=${1:?Wan2.2 checkout}; ckpt=${2:?checkpoint folder}; gpus=${3:-1}
cd "$(dirname "$0")/.."
[ -f "$ckpt/wan_exp_random_weights.json" ] || [ -f "$ckpt/diffusion_pytorch_model.safetensors.index.json" ] \
  || python -m wan_exp.checkpoint write model=s2v_14b out="$ckpt"
if [ "$gpus" -gt 1 ]; then strategies=ulysses,fsdp_fixed; else strategies=single; fi
sweep=outputs/upstream_vs_generate/$(date +%Y-%m-%d_%H-%M-%S)
python launch.py -m workload=generate,upstream parallel=$strategies model=s2v_14b \
  model.checkpoint_dir="$ckpt" workload.repo="$repo" workload.sample_steps=4 workload.clips=1 \
  launcher.nproc_per_node="$gpus" launcher.hang_timeout_s=1200 hydra.sweep.dir="$sweep" || true
# the comparison table, then the upstream / wan-exp section
awk '/^\| strategy/ && !done{p=1} p && /^$/{p=0; done=1} p' "$sweep/report.md"
awk '/^## Upstream generate.py/{p=1; print; next} /^## /{p=0} p' "$sweep/report.md"
