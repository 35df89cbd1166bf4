"""What the comm counter (wan_exp/metrics/comm.py) costs per op: host time of a small op, and
of a fake-group collective, with and without the counter's dispatch mode entered (and with the
simulated rank's RealisticFakeCollectives under it as well, or the CPU tensor counter of
``allocator.count_cpu_tensors``, wan_exp/metrics/tensor_memory.py). Small tensors, so the figure
is the dispatch overhead alone, not the op's own work.

    python bench/comm_counter_cost.py --ops 20000
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from contextlib import ExitStack

import torch
import torch.distributed as dist
from torch.testing._internal.distributed.fake_pg import FakeStore

from benchlib import header
from wan_exp.metrics.comm import CommCounter
from wan_exp.metrics.tensor_memory import TensorMemory
from wan_exp.plan.fake_collectives import RealisticFakeCollectives

WORLD = 4


def per_op_us(call: Callable[[], object], ops: int, modes: list, repeats: int) -> float:
    """Median over ``repeats`` of the mean host time per call, microseconds, under ``modes``."""
    samples = []
    for _ in range(repeats):
        with ExitStack() as stack:
            for mode in modes:
                stack.enter_context(mode())
            start = time.perf_counter()
            for _ in range(ops):
                call()
            samples.append((time.perf_counter() - start) / ops * 1e6)
    return statistics.median(samples)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ops", type=int, default=20000)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    header(ops=args.ops, repeats=args.repeats)
    torch.set_num_threads(1)
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=WORLD)
    small, source, target = torch.ones(16), torch.ones(64), torch.empty(64)
    cases = {
        "add (a non-collective op)": lambda: small.add(1.0),
        "all_reduce (fake group)": lambda: dist.all_reduce(small),
        "all_to_all_single (fake group)": lambda: dist.all_to_all_single(target, source),
    }
    settings = {
        "no mode": [],
        "CommCounter": [CommCounter],
        "CommCounter + RealisticFakeCollectives": [CommCounter, RealisticFakeCollectives],
        "CommCounter + TensorMemory": [CommCounter, TensorMemory],
    }
    print(f"{'op':34s} " + " ".join(f"{name:>40s}" for name in settings) + "   (us per op, median of repeats)")
    for label, call in cases.items():
        times = {name: per_op_us(call, args.ops, modes, args.repeats) for name, modes in settings.items()}
        base = times["no mode"]
        cells = [f"{t:9.2f} (+{t - base:6.2f})" if name != "no mode" else f"{t:9.2f}" for name, t in times.items()]
        print(f"{label:34s} " + " ".join(f"{c:>40s}" for c in cells))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
