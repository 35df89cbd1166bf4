"""``python -m wan_exp.linkbench``: measure this machine's link curves, in nccl-tests' output format.

    torchrun --nproc_per_node 8 -m wan_exp.linkbench --out outputs/linkbench_8xh200.txt
    python -m wan_exp.plan ... link=outputs/linkbench_8xh200.txt

Over the ranks torchrun started (NCCL on GPUs, one per rank; gloo on the CPU), it times
all-reduce, all-gather, reduce-scatter, all-to-all and a ring send/recv (each rank sends to
the next and receives from the previous at once, as nccl-tests' sendrecv_perf) with
torch.distributed, at sizes doubling from ``--min-bytes`` (1 KiB) to ``--max-bytes`` (1 GiB),
and rank 0 writes one table per collective as nccl-tests prints it (size, count, type, redop,
root, time, algbw, busbw; ``size`` as nccl-tests defines it: the all-gather's output, the
reduce-scatter's input, the all-to-all's whole buffer). ``launcher.link=<file>`` reads it
(plan/pricing.py); so does a file from nccl-tests itself.

Times are the slowest rank's mean over ``--iters`` calls after ``--warmup`` calls; busbw =
algbw x the bus factor (2(n-1)/n all-reduce, (n-1)/n all-gather, reduce-scatter, all-to-all,
1 send/recv). torch.distributed adds its own launch overhead per call, so small messages come
out slower than nccl-tests' (which calls NCCL directly): the curve is what this harness sees.
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from wan_exp.metrics.comm import bus_factor

COLLECTIVES = {
    "all_reduce": "all_reduce_perf",
    "all_gather": "all_gather_perf",
    "reduce_scatter": "reduce_scatter_perf",
    "all_to_all": "alltoall_perf",
    "send_recv": "sendrecv_perf",
}
REDOP = {"all_reduce": "sum", "reduce_scatter": "sum"}
HEADER = (
    "#       size         count      type   redop    root     time   algbw   busbw  #wrong\n"
    "#        (B)    (elements)                               (us)  (GB/s)  (GB/s)\n"
)


def _size(text: str) -> int:
    """1024, 1K, 64M, 1G (binary units, as nccl-tests' -b/-e)."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    text = text.strip().upper()
    try:
        return int(text[:-1]) * units[text[-1]] if text[-1:] in units else int(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size; give bytes, e.g. 1024, 64K, 16M, 1G") from err


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m wan_exp.linkbench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--min-bytes", type=_size, default=1 << 10, help="smallest size (default 1K)")
    parser.add_argument("--max-bytes", type=_size, default=1 << 30, help="largest size, the cap (default 1G)")
    parser.add_argument("--iters", type=int, default=20, help="timed calls per size (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed calls first (default 5)")
    parser.add_argument(
        "--collectives", default=",".join(COLLECTIVES), help=f"which of {','.join(COLLECTIVES)} (default all)"
    )
    parser.add_argument(
        "--out", type=Path, default=None, help="the curve file (default outputs/linkbench/<host>_<ranks>x<device>.txt)"
    )
    args = parser.parse_args(argv)
    unknown = [c for c in args.collectives.split(",") if c not in COLLECTIVES]
    if unknown:
        parser.error(f"--collectives: {unknown} are none of {list(COLLECTIVES)}")
    if not 0 < args.min_bytes <= args.max_bytes:
        parser.error(f"--min-bytes {args.min_bytes} and --max-bytes {args.max_bytes}: need 0 < min <= max")
    if args.iters < 1 or args.warmup < 0:
        parser.error("--iters must be >= 1 and --warmup >= 0")
    return args


def _operation(kind: str, count: int, n: int, device: torch.device) -> Callable[[], None]:
    """One call of ``kind`` moving ``count`` float32 elements of nccl-tests' size."""
    rank = dist.get_rank()
    if kind == "all_reduce":
        tensor = torch.ones(count, device=device)
        return lambda: dist.all_reduce(tensor)
    if kind == "all_gather":
        gathered, mine = torch.empty(count, device=device), torch.ones(count // n, device=device)
        return lambda: dist.all_gather_into_tensor(gathered, mine)
    if kind == "reduce_scatter":
        whole, mine = torch.ones(count, device=device), torch.empty(count // n, device=device)
        return lambda: dist.reduce_scatter_tensor(mine, whole)
    if kind == "all_to_all":
        source, target = torch.ones(count, device=device), torch.empty(count, device=device)
        return lambda: dist.all_to_all_single(target, source)
    send, recv = torch.ones(count, device=device), torch.empty(count, device=device)

    def ring_step() -> None:
        ops = [dist.P2POp(dist.isend, send, (rank + 1) % n), dist.P2POp(dist.irecv, recv, (rank - 1) % n)]
        for request in dist.batch_isend_irecv(ops):
            request.wait()

    return ring_step


def _timed_us(call: Callable[[], None], iters: int, warmup: int, device: torch.device) -> float:
    """The slowest rank's mean time per call, microseconds."""
    for _ in range(warmup):
        call()
    _sync(device)
    dist.barrier()
    start = time.perf_counter()
    for _ in range(iters):
        call()
    _sync(device)
    elapsed = torch.tensor([(time.perf_counter() - start) / iters * 1e6], dtype=torch.float64, device=device)
    dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
    return float(elapsed.item())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure(kind: str, sizes: list[int], iters: int, warmup: int, device: torch.device) -> list[str]:
    """nccl-tests rows of ``kind`` (one per size, same columns)."""
    n = dist.get_world_size()
    factor = bus_factor(kind if kind != "send_recv" else "send", n)
    rows = []
    for size in sizes:
        count = size // 4 // n * n  # float32 elements, a multiple of the ranks (equal chunks)
        if count == 0:
            continue
        nbytes = count * 4
        time_us = _timed_us(_operation(kind, count, n, device), iters, warmup, device)
        algbw = nbytes / (time_us * 1e-6) / 1e9
        rows.append(
            f"{nbytes:12d}  {count:12d}  {'float':>8}  {REDOP.get(kind, 'none'):>6}  {-1:6d}  "
            f"{time_us:8.2f}  {algbw:6.2f}  {algbw * factor:6.2f}  {'N/A':>6}"
        )
    return rows


def default_out(n: int, device: torch.device) -> Path:
    name = torch.cuda.get_device_name(device).replace(" ", "_") if device.type == "cuda" else "cpu"
    return Path("outputs") / "linkbench" / f"{socket.gethostname()}_{n}x{name}.txt"


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if "RANK" not in os.environ:
        print(
            "python -m wan_exp.linkbench: start it under torchrun, e.g. "
            "torchrun --nproc_per_node 8 -m wan_exp.linkbench",
            file=sys.stderr,
        )
        return 2
    use_cuda = torch.cuda.is_available()
    device = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}" if use_cuda else "cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if use_cuda else "gloo")
    try:
        n = dist.get_world_size()
        if n < 2:
            if dist.get_rank() == 0:
                print(
                    "python -m wan_exp.linkbench: one rank has no link to measure; start 2 or more "
                    "(torchrun --nproc_per_node N)",
                    file=sys.stderr,
                )
            return 2
        sizes = []
        size = args.min_bytes
        while size <= args.max_bytes:
            sizes.append(size)
            size *= 2
        out = args.out or default_out(n, device)
        device_name = torch.cuda.get_device_name(device) if use_cuda else "cpu"
        lines = [
            (
                f"# nccl-tests format, written by python -m wan_exp.linkbench (torch {torch.__version__}, "
                f"backend {dist.get_backend()}, {n} ranks, {device_name}, {time.strftime('%Y-%m-%d %H:%M:%S')})"
            )
        ]
        for kind in args.collectives.split(","):
            rows = measure(kind, sizes, args.iters, args.warmup, device)
            lines += [f"# Collective test starting: {COLLECTIVES[kind]}", "#", HEADER.rstrip("\n"), *rows]
        if dist.get_rank() == 0:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text("\n".join(lines) + "\n")
            print(f"linkbench: {out} (launcher.link={out} prices a plan with it)")
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
