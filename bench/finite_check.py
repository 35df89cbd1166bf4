"""Cost of the per-step finiteness check (wan_exp.rank.numerics.check_finite) on one GPU.

The generate workload checks the guided velocity once per step and the latents once per
clip; train_lora checks the loss once per step. Each check reads one boolean on the host,
so it costs a reduction kernel plus one device synchronisation. This prints both, for the
latent shape of a clip, next to a step time so the overhead reads as a fraction::

    python bench/finite_check.py --size 480*832 --frames 80 --step-s 5.84

``--step-s``: a measured step time (docs/benchmarks.md: 5.838 s for s2v_14b at 480x832,
one clip step = 2 DiT forwards). The check's time is measured with the device idle (the
worst case for the sync: nothing queued behind it to hide the host round trip).
"""

from __future__ import annotations

import argparse
import time

import torch

from benchlib import event_time, header, median
from wan_exp.config import parse_size
from wan_exp.rank.numerics import check_finite

LATENT_CHANNELS = 16
VAE_STRIDE = 8
FRAMES_PER_LATENT = 4


def host_round_trip_s(tensor: torch.Tensor, repeat: int) -> float:
    """Median wall seconds of one check_finite call, device idle before it."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        check_finite(tensor, "latents")
        times.append(time.perf_counter() - start)
    return median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", default="480*832", help="H*W in pixels")
    parser.add_argument("--frames", type=int, default=80, help="video frames per clip")
    parser.add_argument("--step-s", type=float, default=None, help="a measured step time to compare with")
    parser.add_argument("--repeat", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    height, width = parse_size(args.size)
    shape = (1, LATENT_CHANNELS, args.frames // FRAMES_PER_LATENT, height // VAE_STRIDE, width // VAE_STRIDE)
    header(shape=shape)
    latents = torch.randn(shape, device="cuda", dtype=torch.float32)
    loss = latents.square().mean()
    kernel_s = event_time(lambda: torch.isfinite(latents).all(), repeat=args.repeat)
    latents_s = host_round_trip_s(latents, args.repeat)
    loss_s = host_round_trip_s(loss, args.repeat)
    print(f"isfinite().all() kernel on {latents.numel():,} values: {kernel_s * 1e6:.1f} us")
    print(f"check_finite(latents) incl. host sync: {latents_s * 1e6:.1f} us")
    print(f"check_finite(loss scalar) incl. host sync: {loss_s * 1e6:.1f} us")
    if args.step_s:
        print(f"per step (one check): {100 * latents_s / args.step_s:.4f} % of a {args.step_s} s step")


if __name__ == "__main__":
    main()
