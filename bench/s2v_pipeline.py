"""One S2V-14B clip end to end on one GPU: seconds and peak memory per pipeline stage, then the
VAE decode's time and peak for each parallel.vae mode one GPU can run.

    python bench/s2v_pipeline.py                       # 480*832, 40 steps, random weights
    python bench/s2v_pipeline.py --steps 4 --vae-only  # quick look / only the decode modes

Weights are random (no checkpoint), the audio and the reference are synthetic; the run is the
generate workload itself (wan_exp.workloads.generate.run_generate) with parallel=single, so the
stages are the ones a job records (docs/pipeline.md). ``video_write`` is measured too: the
video goes to a temporary job dir. The decode modes run on the latents of one clip after the
motion latents (19 + 20 latent frames, as the pipeline decodes them); ``sharded`` needs two
ranks and is left out. Prints a JSON line per figure after the header.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

from benchlib import REPO, header
from wan_exp.config import ExperimentConfig
from wan_exp.models.vae import build_vae
from wan_exp.parallel.vae import decode_clip
from wan_exp.rank.runtime import RankContext
from wan_exp.units import GIB

SINGLE_GPU_MODES = ("every_rank", "rank0", "tiled")


def experiment_config(size: str, steps: int, extra: list[str]):
    """The job's config without Hydra's composition: the schema, conf/model/s2v_14b.yaml, the
    generate workload at upstream's defaults, one rank."""
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.model = OmegaConf.merge(cfg.model, OmegaConf.load(REPO / "conf" / "model" / "s2v_14b.yaml"))
    settings = [
        f"workload.size={size}",
        f"workload.sample_steps={steps}",
        "workload.clips=1",
        "workload.warmup_steps=1",
        "workload.guidance_scale=4.5",
        "workload.shift=3.0",
        "workload.save_video=true",
        "parallel.name=single",
        "logger.mode=disabled",
        *extra,
    ]
    return OmegaConf.merge(cfg, OmegaConf.from_dotlist(settings))


def pipeline(cfg, job_dir: Path) -> dict:
    from wan_exp.workloads.generate import run_generate

    ctx = RankContext(cfg, 0, 0, 1, torch.device("cuda", 0), job_dir)
    start = time.perf_counter()
    info = run_generate(cfg, ctx)
    wall = time.perf_counter() - start
    record = ctx.metrics.rank_record()
    return {
        "wall_s": wall,
        "init_phases_s": record["init_phases_s"],
        "stages": record["stages"],
        "step_times_s": record["step_times_s"],
        "memory": record["memory"],
        "workload": info,
    }


def decode_modes(cfg) -> list[dict]:
    device = torch.device("cuda", 0)
    vae = build_vae(cfg.model, device)
    height, width = (int(v) for v in str(cfg.workload.size).split("*"))
    latents = torch.randn(
        1, 16, cfg.model.motion_frames + cfg.workload.frames_per_clip // 4, height // 8, width // 8, device=device
    )
    rows = []
    for mode in SINGLE_GPU_MODES:
        for _attempt in ("warm-up", "measured"):
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            start = time.perf_counter()
            pixels = decode_clip(vae, latents, mode, rank=0, world_size=1)
            torch.cuda.synchronize()
            seconds = time.perf_counter() - start
            del pixels
        rows.append(
            {
                "mode": mode,
                "seconds": seconds,
                "frames": 1 + 4 * (latents.shape[2] - 1),
                "peak_allocated_gib": torch.cuda.max_memory_allocated() / GIB,
                "peak_above_weights_gib": (torch.cuda.max_memory_allocated() - base) / GIB,
                "peak_reserved_gib": torch.cuda.max_memory_reserved() / GIB,
            }
        )
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="480*832")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vae-only", action="store_true", help="only the decode modes")
    parser.add_argument("--set", nargs="*", default=[], help="more config settings, key=value")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/s2v_pipeline.py needs a CUDA GPU")
    cfg = experiment_config(args.size, args.steps, args.set)
    header(model="s2v_14b (random weights)", size=args.size, steps=args.steps)
    if not args.vae_only:
        with tempfile.TemporaryDirectory() as job_dir:
            result = pipeline(cfg, Path(job_dir))
        for name, entry in result["stages"].items():
            print(json.dumps({"stage": name, **entry}))
        total = sum(e["seconds"] for e in result["stages"].values())
        print(
            json.dumps(
                {
                    "pipeline_s": total,
                    "dit_share": result["stages"]["denoise"]["seconds"] / total,
                    "seconds_per_video_second": total / result["workload"]["video_seconds"],
                    "step_s_median": statistics.median(result["step_times_s"] or [float("nan")]),
                    "init_phases_s": result["init_phases_s"],
                    "memory": result["memory"],
                }
            )
        )
        torch.cuda.empty_cache()
    for row in decode_modes(cfg):
        print(json.dumps({"vae_decode": row}))


if __name__ == "__main__":
    main()
