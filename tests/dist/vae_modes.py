"""Every parallel.vae mode against the plain whole-frame decode, on the ranks of one launch.

Run under ``torchrun --nproc_per_node 2`` (gloo on the CPU; tests/test_pipeline.py does).
On every rank, for each mode: the pixels equal the plain decode within TOLERANCE where the
mode leaves pixels (rank0: rank 0 only, None elsewhere), and the motion latents re-encoded
from them equal the plain ones on every rank (rank0 broadcasts them). The largest difference
of each mode is printed by rank 0 as ``max_abs_diff <mode> <value>``. Exits with status 1
naming the mode at the first mismatch.
"""
from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the tolerance module
from tolerance import reordered_sum_tolerance, vae_decoder_chain, vae_encoder_chain  # noqa: E402

from wan_exp.models.vae import WanVAE
from wan_exp.parallel.vae import VAE_MODES, decode_clip, encode_motion

MOTION_FRAMES = 5  # pixel frames re-encoded (2 latent frames)
# In fp64 (the CPU's fp32 convolutions round differently per tile shape). Pixels in [-1, 1] from
# a decode whose sums ran over other shapes (tiles, strips): an absolute bound, at the scale of
# the decoder's activations (below 10: tests/test_pipeline.py DECODE_TOLERANCE)
TOLERANCE = 10 * reordered_sum_tolerance(torch.float64, *vae_decoder_chain(4, positions=4 * 40))
# the motion latents: that input difference (relative, pixels of order one) carried through the
# encoder's chain, whose RMS norms keep every layer at unit scale, so it adds at most once per
# layer (first order), plus the encoder's own reordering
_ENCODER_TERMS, _ENCODER_DEPTH = vae_encoder_chain(4)
MOTION_TOLERANCE = TOLERANCE * _ENCODER_DEPTH + reordered_sum_tolerance(torch.float64, _ENCODER_TERMS, _ENCODER_DEPTH)


def main() -> int:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    vae = WanVAE(4).eval().double()
    z = torch.randn(1, 16, 2, 4, 40, dtype=torch.float64)  # 40 latents wide: strips wider than the halo
    plain = vae.decode(z)
    plain_motion = vae.encode(plain[:, :, -MOTION_FRAMES:])
    for mode in VAE_MODES:
        pixels = decode_clip(vae, z, mode, rank, world)
        if mode == "rank0" and rank != 0:
            if pixels is not None:
                print(f"FAIL {mode}: rank {rank} holds pixels", flush=True)
                return 1
        else:
            diff = (pixels - plain).abs().max().item()
            if rank == 0:
                print(f"max_abs_diff {mode} {diff:.3e}", flush=True)
            if diff > TOLERANCE:
                print(f"FAIL {mode}: rank {rank} pixels differ by {diff}", flush=True)
                return 1
        buffer = None if pixels is None else pixels[:, :, -MOTION_FRAMES:]
        motion = encode_motion(vae, buffer, mode, rank, world, tuple(plain_motion.shape))
        if (motion - plain_motion).abs().max().item() > MOTION_TOLERANCE:
            print(f"FAIL {mode}: rank {rank} motion latents differ", flush=True)
            return 1
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
