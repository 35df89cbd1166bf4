"""The sampler: upstream's grid and integer timesteps, UniPC against Euler on a flow with a
known answer, and the guidance combination of one step."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from wan_exp.parallel.cfg import Condition, guided_flow
from wan_exp.workloads.sampler import model_timesteps, sample, sigma_schedule


def test_timesteps_of_upstreams_grid():
    forty = model_timesteps(sigma_schedule(40, 3.0)).tolist()
    assert forty[:5] == [999, 991, 982, 973, 963] and forty[-3:] == [195, 136, 71] and len(forty) == 40
    assert model_timesteps(sigma_schedule(4, 3.0)).tolist() == [999, 899, 749, 499]
    # by hand: 0.999 shifted by 3 is 2.997 / 2.998; truncated, not rounded
    assert sigma_schedule(4, 3.0)[0] == pytest.approx(2.997 / 2.998)


def gaussian_flow(mean: float, std: float):
    """The exact flow of data N(mean, std^2) along x_s = (1 - s) x0 + s n, and the ODE's exact
    map from the point at sigma s0 to the data: x(s) = (1 - s) mean + r(s) z, r(s)^2 =
    (1 - s)^2 std^2 + s^2, so dx/ds = -mean + (s - (1 - s) std^2) / r(s)^2 (x - (1 - s) mean)."""

    def radius(s: float) -> float:
        return math.sqrt((1 - s) ** 2 * std**2 + s**2)

    def flow(x: torch.Tensor, s: float) -> torch.Tensor:
        return -mean + (s - (1 - s) * std**2) / radius(s) ** 2 * (x - (1 - s) * mean)

    def start_and_answer(z: torch.Tensor, s0: float) -> tuple[torch.Tensor, torch.Tensor]:
        return (1 - s0) * mean + radius(s0) * z, mean + std * z

    return flow, start_and_answer


@pytest.mark.parametrize("steps, mean, std, unipc_bound", [(40, 0.7, 0.3, 0.01), (12, 1.0, 2.0, 0.08)])
def test_unipc_error_is_far_below_eulers_on_a_flow_with_a_known_answer(steps, mean, std, unipc_bound):
    flow, start_and_answer = gaussian_flow(mean, std)
    sigmas = sigma_schedule(steps, 3.0)
    sigma_of = dict(zip(model_timesteps(sigmas).tolist(), sigmas.tolist()))
    seen = []

    def flow_at(x, timestep):  # the sampler hands the DiT integer timesteps
        seen.append(int(timestep))
        return flow(x, sigma_of[int(timestep)])

    z = torch.linspace(-2, 2, 9, dtype=torch.float64).view(1, 1, 9)  # (batch, channels, ...) as latents
    x_start, answer = start_and_answer(z, float(sigmas[0]))
    errors = {}
    for name in ("unipc", "euler"):
        seen.clear()
        out = sample(flow_at, x_start, steps, 3.0, sampler=name)
        assert seen == model_timesteps(sigmas).tolist()
        errors[name] = (out - answer).abs().max().item()
    # second order vs first: UniPC's error is several times smaller (measured 9x and 7x)
    assert errors["unipc"] < errors["euler"] / 5 and errors["unipc"] < unipc_bound, errors


def test_euler_is_the_straight_step_on_the_grid():
    sigmas = [*sigma_schedule(3, 3.0).tolist(), 0.0]
    x0 = torch.tensor([0.25], dtype=torch.float64)
    expected = x0.clone()
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        expected = expected + (s_next - s) * (expected * 2.0)
    out = sample(lambda x, t: x * 2.0, x0, 3, 3.0, sampler="euler")
    torch.testing.assert_close(out, expected)


def test_unknown_sampler_and_bad_grid_are_named():
    with pytest.raises(ValueError, match=r"workload\.sampler='heun' is not one of"):
        sample(lambda x, t: x, torch.zeros(1), 2, 3.0, sampler="heun")
    with pytest.raises(ValueError, match=r"workload\.sample_steps must be >= 1, got 0"):
        sigma_schedule(0, 3.0)
    with pytest.raises(ValueError, match=r"workload\.shift must be > 0"):
        sigma_schedule(4, 0.0)


class RecordingDiT(torch.nn.Module):
    """flow = latents * (1 + the context's mean) + timestep / 1000; records each call's context."""

    def __init__(self) -> None:
        super().__init__()
        self.contexts: list[float] = []

    def forward(self, latents, timestep, context, audio=None, ref=None, motion=None):
        self.contexts.append(float(context.mean()))
        return latents * (1 + context.mean()) + timestep.float() / 1000


@pytest.mark.parametrize("scale, calls", [(4.5, [1.0, -1.0]), (1.0, [1.0]), (0.0, [-1.0])])
def test_guided_flow_runs_conditional_first_and_combines_by_the_formula(scale, calls):
    dit = RecordingDiT()
    x, t = torch.full((1, 2), 0.5), torch.tensor([500])
    cond, uncond = Condition(torch.ones(1, 3)), Condition(-torch.ones(1, 3))
    out = guided_flow(dit, x, t, cond, uncond, scale)
    assert dit.contexts == calls
    flow_cond, flow_uncond = x * 2 + 0.5, x * 0 + 0.5
    torch.testing.assert_close(out, flow_uncond + scale * (flow_cond - flow_uncond))


def test_sigma_grid_is_the_shifted_linspace():
    unshifted = np.linspace(0.999, 0.0, 41)[:-1]
    np.testing.assert_allclose(sigma_schedule(40, 5.0), 5 * unshifted / (1 + 4 * unshifted))


@pytest.mark.parametrize("sampler", ["unipc", "euler"])
def test_the_state_stays_in_the_noises_dtype_as_upstream_keeps_it(sampler):
    """bf16 noise and an fp32 flow (the DiT's output): every x the flow is handed is bf16, and
    an Euler step is the fp32 update rounded back to bf16 (upstream's scheduler casts its
    result to the sample's dtype)."""
    noise = torch.linspace(-2, 2, 16).view(1, 1, 16).to(torch.bfloat16)
    seen = []

    def flow(x, timestep):
        seen.append(x)
        return x.float() * 0.75 + 0.1

    out = sample(flow, noise, 3, 3.0, sampler=sampler)
    assert out.dtype == torch.bfloat16 and all(x.dtype == torch.bfloat16 for x in seen) and len(seen) == 3
    if sampler == "euler":
        sigmas = [*sigma_schedule(3, 3.0).tolist(), 0.0]
        expected = noise
        for s, s_next in itertools.pairwise(sigmas):
            expected = (expected.float() + (s_next - s) * (expected.float() * 0.75 + 0.1)).to(torch.bfloat16)
        assert torch.equal(out, expected)
