"""The flow-matching sampler against trajectories worked out by hand."""
from contextlib import nullcontext

import pytest
import torch

from wan_exp.workloads.sampler import (
    forwards_per_step,
    guided_velocity,
    sample,
    sigma_schedule,
)


def recording(velocity, calls, name):
    """Wrap a velocity callable so each call appends (name, x, sigma) to `calls`."""

    def wrapped(x, sigma):
        calls.append((name, x.item(), sigma))
        return velocity(x, sigma)

    return wrapped


def test_shifted_schedule_by_hand():
    # t = 1, .75, .5, .25, 0 ; sigma = 3t / (1 + 2t)
    assert sigma_schedule(4, 3.0) == pytest.approx([1.0, 0.9, 0.75, 0.5, 0.0])
    assert sigma_schedule(4, 1.0) == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])


def test_euler_trajectory_of_linear_velocity_by_hand():
    # v(x) = -2x + 1 from x = 1 over sigmas 1, .9, .75, .5, 0:
    # x1 = 1 + (-.1)(-1) = 1.1 ; x2 = 1.1 + (-.15)(-1.2) = 1.28
    # x3 = 1.28 + (-.25)(-1.56) = 1.67 ; x4 = 1.67 + (-.5)(-2.34) = 2.84
    calls = []
    velocity = recording(lambda x, s: -2 * x + 1, calls, "v")
    out = sample(velocity, torch.tensor(1.0, dtype=torch.float64), sigma_schedule(4, 3.0))
    assert [c[1] for c in calls] == pytest.approx([1.0, 1.1, 1.28, 1.67])
    assert [c[2] for c in calls] == pytest.approx([1.0, 0.9, 0.75, 0.5])
    assert out.item() == pytest.approx(2.84)


def test_guided_trajectory_by_hand_and_two_forwards_per_step():
    # cond v = -2x + 1, uncond v = x, scale 4.5 -> guided v = -12.5x + 4.5
    # sigmas (2 steps, shift 3): 1, .75, 0
    # x1 = 1 + (-.25)(-8) = 3 ; x2 = 3 + (-.75)(-33) = 27.75
    calls = []
    cond = recording(lambda x, s: -2 * x + 1, calls, "cond")
    uncond = recording(lambda x, s: x, calls, "uncond")
    out = sample(guided_velocity(cond, uncond, 4.5), torch.tensor(1.0, dtype=torch.float64),
                 sigma_schedule(2, 3.0))
    assert out.item() == pytest.approx(27.75)
    assert [c[0] for c in calls] == ["cond", "uncond", "cond", "uncond"]
    assert [c[1] for c in calls] == pytest.approx([1.0, 1.0, 3.0, 3.0])
    assert forwards_per_step(4.5) == 2


@pytest.mark.parametrize("scale, only", [(1.0, "cond"), (0.0, "uncond")])
def test_scale_one_and_zero_take_one_forward_and_match_the_formula(scale, only):
    calls = []
    cond = recording(lambda x, s: -2 * x + 1, calls, "cond")
    uncond = recording(lambda x, s: x, calls, "uncond")
    sigmas = sigma_schedule(3, 3.0)
    x = torch.tensor(0.5, dtype=torch.float64)
    out = sample(guided_velocity(cond, uncond, scale), x, sigmas)
    assert [c[0] for c in calls] == [only] * 3
    assert forwards_per_step(scale) == 1

    def formula(x, s):  # both forwards, combined by the CFG formula
        v_uncond = x
        return v_uncond + scale * ((-2 * x + 1) - v_uncond)

    assert out.item() == pytest.approx(sample(formula, x, sigmas).item())


def test_straight_flow_lands_on_the_data_for_any_schedule():
    # x_sigma = x0 + sigma * n has velocity (x - x0) / sigma = n: Euler is exact on it.
    x0 = torch.tensor([0.3, -1.2, 2.0], dtype=torch.float64)
    noise = torch.tensor([1.0, 0.5, -0.7], dtype=torch.float64)
    steps = []
    out = sample(lambda x, s: (x - x0) / s, noise, sigma_schedule(5, 3.0),
                 step_context=lambda i: _record_step(steps, i))
    torch.testing.assert_close(out, x0)
    assert steps == [0, 1, 2, 3, 4]


def _record_step(steps, i):
    steps.append(i)
    return nullcontext()


def test_bad_schedule_arguments_are_named():
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sigma_schedule(0, 3.0)
    with pytest.raises(ValueError, match="shift must be > 0"):
        sigma_schedule(4, 0.0)
