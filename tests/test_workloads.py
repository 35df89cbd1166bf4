"""generate and init workloads on the tiny model, one rank in-process; wav input."""
from __future__ import annotations

import struct
import wave
from contextlib import nullcontext

import pytest
import torch

from wan_exp.config import compose_config as compose_experiment
from wan_exp.metrics.flops import dit_forward_flops
from wan_exp.models.wan_s2v import sequence_length
from wan_exp.parallel.registry import setup_parallel
from wan_exp.runtime import RankContext
from wan_exp.workloads import WORKLOADS
from wan_exp.workloads.generate import generate_clips
from wan_exp.workloads.inputs import SAMPLE_RATE, encode_job_inputs, read_wav



def compose_config(*overrides: str):
    return compose_experiment(["model=tiny", "parallel=single", *overrides])


def rank_context(cfg) -> RankContext:
    return RankContext(cfg, 0, 0, 1, torch.device("cpu"), None)


class ForwardLog:
    """Records the motion latents and the step of every DiT forward (a forward pre-hook)."""

    def __init__(self, dit: torch.nn.Module) -> None:
        self.calls: list[tuple[int, torch.Tensor | None]] = []
        self.step = -1
        dit.register_forward_pre_hook(self.hook, with_kwargs=True)

    def hook(self, module, args, kwargs):
        self.calls.append((self.step, kwargs.get("motion")))

    def scope(self, step: int):
        self.step = step
        return nullcontext()


@pytest.mark.parametrize("guidance_scale, forwards", [(4.5, 2), (1.0, 1)])
def test_clip_loop_forwards_per_step_and_motion_carried_from_clip_to_clip(guidance_scale, forwards):
    cfg = compose_config("workload.clips=3", "workload.sample_steps=2",
                         f"workload.guidance_scale={guidance_scale}")
    parallel_model = setup_parallel(cfg, rank_context(cfg))
    inputs = encode_job_inputs(cfg, parallel_model, torch.device("cpu"))
    log = ForwardLog(parallel_model.dit)
    clips = generate_clips(cfg, parallel_model.dit, inputs, log.scope)

    steps = [step for step, _ in log.calls]
    assert steps == [s for s in range(6) for _ in range(forwards)]
    motion_of_clip = [log.calls[clip * 2 * forwards][1] for clip in range(3)]
    assert motion_of_clip[0] is None  # the first clip has no motion history
    frames = cfg.model.motion_frames  # 19 latent frames of history; a clip has 2
    zeros = torch.zeros_like(clips[0][:, :, :1]).expand(-1, -1, frames - 2, -1, -1)
    torch.testing.assert_close(motion_of_clip[1], torch.cat([zeros, clips[0]], dim=2))
    torch.testing.assert_close(motion_of_clip[2], torch.cat([zeros[:, :, 2:], clips[0], clips[1]], dim=2))
    # every forward of a clip sees that clip's motion
    for step, motion in log.calls:
        clip = step // 2
        if clip > 0:
            torch.testing.assert_close(motion, motion_of_clip[clip])


def test_generate_records_measured_steps_and_token_counts():
    cfg = compose_config("workload.clips=2", "workload.sample_steps=2", "workload.warmup_steps=1")
    ctx = rank_context(cfg)
    info = WORKLOADS["generate"](cfg, ctx)
    record = ctx.metrics.rank_record()
    assert len(record["step_times_s"]) == 3 and record["warmup_steps"] == 1
    assert record["init_phases_s"]["first_step"] > 0 and record["other_phases_s"]["encode"] > 0
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


def test_wav_is_read_as_16khz_mono(tmp_path):
    # 8 kHz stereo 16-bit: left +0.5, right -0.25 -> mono 0.125 at twice the sample count
    path = tmp_path / "speech.wav"
    with wave.open(str(path), "wb") as wav:
        wav.setnchannels(2)
        wav.setsampwidth(2)
        wav.setframerate(SAMPLE_RATE // 2)
        wav.writeframes(struct.pack("<hh", 16384, -8192) * 800)
    mono = read_wav(path)
    assert mono.shape == (1600,)
    torch.testing.assert_close(mono, torch.full((1600,), 0.125))


def test_missing_wav_names_the_setting(tmp_path):
    with pytest.raises(FileNotFoundError, match="workload.audio_path=.*does not exist"):
        read_wav(tmp_path / "none.wav")
