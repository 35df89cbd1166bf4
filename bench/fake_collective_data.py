"""Does the data a simulated rank computes on change its speed? Two measurements on one GPU:

1. which collectives torch's fake process group (the simulated world size) leaves unwritten in
   this torch: their outputs keep what they were allocated with;
2. sustained bf16 matrix products of a DiT linear layer's shape on random operands against
   zero operands (what an unwritten, freshly allocated buffer often holds): a GPU that draws
   less power on zeros keeps higher clocks and finishes sooner.

    python bench/fake_collective_data.py --tokens 30000 --seconds 5
"""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from benchlib import header
from wan_exp.plan.fake_collectives import RealisticFakeCollectives

WORLD = 4


def unwritten_outputs(device: torch.device, realistic: bool) -> dict[str, bool]:
    """Collective kind -> whether its output still holds the NaN it was allocated with."""
    nan = lambda *shape: torch.full(shape, float("nan"), device=device)  # noqa: E731
    with RealisticFakeCollectives() if realistic else nullcontext():
        a2a, scattered, received = nan(8), nan(2), nan(3)
        dist.all_to_all_single(a2a, torch.arange(8.0, device=device))
        dist.reduce_scatter_tensor(scattered, torch.arange(8.0, device=device))
        requests = dist.batch_isend_irecv(
            [dist.P2POp(dist.isend, torch.ones(3, device=device), 1), dist.P2POp(dist.irecv, received, WORLD - 1)]
        )
        for request in requests:
            request.wait()
    return {
        "all_to_all": bool(a2a.isnan().all()),
        "reduce_scatter": bool(scattered.isnan().all()),
        "recv": bool(received.isnan().all()),
    }


def sustained_tflops(a: torch.Tensor, b: torch.Tensor, seconds: float) -> float:
    """TFLOP/s of back-to-back a @ b for about ``seconds`` (after a one-second warm-up)."""
    flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
    for budget in (1.0, seconds):
        torch.cuda.synchronize()
        start, calls = time.perf_counter(), 0
        while time.perf_counter() - start < budget:
            for _ in range(20):
                a @ b
            calls += 20
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
    return flops * calls / elapsed / 1e12


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=30000, help="rows of the activation (tokens per rank)")
    parser.add_argument("--dim", type=int, default=5120, help="model width (s2v_14b: 5120)")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured seconds per operand kind")
    args = parser.parse_args()
    header()
    device = torch.device("cuda")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    for realistic in (False, True):
        label = "with RealisticFakeCollectives" if realistic else "fake process group alone"
        print(f"unwritten outputs, {label}: {unwritten_outputs(device, realistic)}")
    dist.destroy_process_group()
    weight = torch.randn(args.dim, args.dim, device=device, dtype=torch.bfloat16) / args.dim**0.5
    operands = {
        "random": torch.randn(args.tokens, args.dim, device=device, dtype=torch.bfloat16),
        "zeros": torch.zeros(args.tokens, args.dim, device=device, dtype=torch.bfloat16),
    }
    results = {}
    for kind in ("random", "zeros", "random"):  # random twice: the first and the last bracket zeros
        results.setdefault(kind, []).append(sustained_tflops(operands[kind], weight, args.seconds))
        print(
            f"bf16 ({args.tokens} x {args.dim}) @ ({args.dim} x {args.dim}), {kind} activations: "
            f"{results[kind][-1]:.0f} TFLOP/s"
        )
    base = sum(results["random"]) / len(results["random"])
    print(f"zeros / random: {results['zeros'][0] / base:.3f}")


if __name__ == "__main__":
    main()
