"""generate and init workloads on the tiny model, one rank in-process."""

from __future__ import annotations

import pytest
import torch

from wan_exp.config import compose_config as compose_experiment
from wan_exp.geometry import sequence_length
from wan_exp.metrics.flops import dit_forward_flops
from wan_exp.rank.runtime import RankContext
from wan_exp.workloads import WORKLOADS, generate
from wan_exp.workloads.sampler import model_timesteps, sigma_schedule

pytestmark = pytest.mark.usefixtures("one_cpu_thread")


def compose_config(*overrides: str):
    return compose_experiment(["model=tiny", "parallel=single", *overrides])


def rank_context(cfg) -> RankContext:
    return RankContext(cfg, 0, 0, 1, torch.device("cpu"), None)


class ForwardLog:
    """Records the timestep, context, audio and motion of every DiT forward (a forward pre-hook),
    installed by wrapping the workload's setup_parallel."""

    def __init__(self, monkeypatch) -> None:
        self.calls: list[dict] = []
        original = generate.setup_parallel

        def setup(cfg, ctx):
            model = original(cfg, ctx)
            model.dit.register_forward_pre_hook(self.hook, with_kwargs=True)
            return model

        monkeypatch.setattr(generate, "setup_parallel", setup)

    def hook(self, module, args, kwargs):
        latents, timestep, context = args
        self.calls.append(
            {
                "timestep": int(timestep[0]),
                "context": context.clone(),
                "audio": kwargs.get("audio"),
                "motion": kwargs.get("motion"),
            }
        )


@pytest.mark.parametrize("guidance_scale, forwards", [(4.5, 2), (1.0, 1)])
def test_clip_loop_forwards_timesteps_guidance_branches_and_motion(monkeypatch, guidance_scale, forwards):
    cfg = compose_config("workload.clips=2", "workload.sample_steps=3", f"workload.guidance_scale={guidance_scale}")
    log = ForwardLog(monkeypatch)
    WORKLOADS["generate"](cfg, rank_context(cfg))
    assert len(log.calls) == 2 * 3 * forwards
    expected_t = model_timesteps(sigma_schedule(3, cfg.workload.shift)).tolist()
    assert [c["timestep"] for c in log.calls] == [t for _ in range(2) for t in expected_t for _ in range(forwards)]
    first_clip, second_clip = log.calls[: 3 * forwards], log.calls[3 * forwards :]
    assert all(c["motion"] is None for c in first_clip)  # no motion tokens in the first clip
    motion = second_clip[0]["motion"]
    assert motion.shape == (1, 16, cfg.model.motion_frames, 8, 8)  # re-encoded from decoded pixels
    assert all(torch.equal(c["motion"], motion) for c in second_clip)
    if forwards == 2:  # the unconditional branch: the negative prompt and zero audio
        cond, uncond = log.calls[0], log.calls[1]
        assert not torch.equal(cond["context"], uncond["context"])
        assert cond["audio"].abs().sum() > 0 and not uncond["audio"].any()


def test_generate_records_measured_steps_and_token_counts():
    cfg = compose_config("workload.clips=2", "workload.sample_steps=2", "workload.warmup_steps=1")
    ctx = rank_context(cfg)
    info = WORKLOADS["generate"](cfg, ctx)
    record = ctx.metrics.rank_record()
    assert len(record["step_times_s"]) == 3 and record["warmup_steps"] == 1
    assert record["init_phases_s"]["first_step"] > 0
    stages = record["stages"]
    assert {"text_encode", "audio_encode", "reference_encode", "denoise", "vae_decode", "motion_encode"} == set(stages)
    assert stages["denoise"]["count"] == 2 and stages["vae_decode"]["count"] == 2
    assert stages["motion_encode"]["count"] == 2  # zero pixels before clip 0, then after clip 0
    assert all(s["seconds"] > 0 and s["peak_host_rss_gib"] > 0 for s in stages.values())
    assert stages["denoise"]["peak_allocated_gib"] is None  # CPU: no device figures, never 0
    assert sum(record["step_times_s"]) < stages["denoise"]["seconds"]  # the steps are inside denoise
    # two clips of 8 frames, less the 3 upstream drops from the first
    assert info["text_branch"] == "synthetic" and info["video_frames"] == 2 * 8 - 3
    assert info["video_seconds"] == pytest.approx((2 * 8 - 3) / 16)
    first, later = (sequence_length(cfg.model, 64, 64, 8, with_motion=m) for m in (False, True))
    assert info["tokens_per_clip"] == [first, later] and first < later
    # measured steps: one of the first clip (no motion), two of the second
    assert info["tokens_per_forward"] == pytest.approx((first + 2 * later) / 3)
    assert info["forwards_per_step"] == 2
    assert info["video_seconds_per_step"] == pytest.approx(8 / 16 / 2)
    trunk_only = 2 * dit_forward_flops(cfg.model, later)
    assert info["flops_per_step"] > 0 and record["workload"]["flops_per_step"] == info["flops_per_step"]
    assert info["flops_per_step"] < trunk_only * 1.5  # plausible: about two forwards of the trunk


def test_init_times_build_load_and_wrap():
    cfg = compose_config("workload=init")
    ctx = rank_context(cfg)
    info = WORKLOADS["init"](cfg, ctx)
    phases = ctx.metrics.rank_record()["init_phases_s"]
    assert {"build", "load", "wrap"} <= phases.keys()
    assert all(phases[name] > 0 for name in ("build", "load", "wrap"))
    assert "first_step" not in phases and ctx.metrics.rank_record()["step_times_s"] == []
    assert info["dit_local_parameters"] > 0
