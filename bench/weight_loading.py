"""Weight loading from local disk onto the GPU, against the disk's own sequential read rate.

    python bench/weight_loading.py --model s2v_14b --folder /tmp/wan_ckpt

1. Random weights (``RandomWeights``, drawn on the GPU, bf16) are written in the official
   sharded layout (``write_checkpoint``: 4 safetensors shards + index json) to ``--folder``,
   which must be on the local disk. ``--layers K`` writes the model with K blocks instead of
   all (a subset, when the disk or the time budget is too small: the figure says so).
2. The page cache is dropped (``sync; echo 3 > /proc/sys/vm/drop_caches``, needs root), then
   every shard is read once, sequentially, in 64 MiB ``readinto`` calls: the disk's measured
   sequential read bandwidth (one stream), and again with one stream per shard at once.
3. The page cache is dropped again and the folder is loaded the way a rank loads it:
   ``CheckpointReader`` + ``load_into`` a meta-device model, onto the GPU, bf16.
The goal: step 3 at no less than half the one-stream bandwidth of step 2.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import shutil
import subprocess
import time
from pathlib import Path

import torch

from benchlib import header, load_model_config
from wan_exp.models.checkpoint import CheckpointReader, RandomWeights, load_into, write_checkpoint
from wan_exp.models.wan_s2v import WanModel
from wan_exp.units import GIB

READ_CHUNK = 64 * 2**20


def drop_page_cache() -> None:
    subprocess.run(["sync"], check=True)
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
    except OSError as err:
        raise SystemExit(
            f"cannot drop the page cache ({err}): run as root, or the read figures would measure memory, not the disk"
        ) from err


def read_file(path: Path) -> int:
    buffer = bytearray(READ_CHUNK)
    view, total = memoryview(buffer), 0
    with open(path, "rb", buffering=0) as fh:
        while n := fh.readinto(view):
            total += n
    return total


def read_rate(paths: list[Path], streams: int) -> float:
    """Bytes per second reading ``paths`` once from a cold page cache, ``streams`` at a time."""
    drop_page_cache()
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        total = sum(pool.map(read_file, paths))
    return total / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="s2v_14b")
    parser.add_argument("--folder", type=Path, default=Path("/tmp/wan_ckpt"), help="on the local disk")
    parser.add_argument("--layers", type=int, default=None, help="write a model of this many blocks (subset)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoint folder afterwards")
    args = parser.parse_args()

    cfg = load_model_config(args.model, **({"num_layers": args.layers} if args.layers else {}))
    device = torch.device("cuda")
    with torch.device("meta"):
        model = WanModel(cfg)
    total_bytes = sum(p.numel() * 2 for p in model.state_dict().values())  # bf16
    args.folder.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.folder).free
    if free < total_bytes + 4 * GIB:
        raise SystemExit(
            f"--folder {args.folder}: {free / GIB:.1f} GiB free, the checkpoint needs "
            f"{total_bytes / GIB:.1f} GiB + 4 GiB headroom; pass --layers K for a subset"
        )
    mount = subprocess.run(["df", "-h", str(args.folder)], capture_output=True, text=True).stdout.strip()

    start = time.perf_counter()
    source = RandomWeights(cfg, cfg.seed)
    state = {key: source.get(key, torch.bfloat16, device).cpu() for key in model.state_dict()}
    generate_s = time.perf_counter() - start
    start = time.perf_counter()
    write_checkpoint(state, args.folder, shards=4)
    subprocess.run(["sync"], check=True)
    write_s = time.perf_counter() - start
    del state
    shards = sorted(args.folder.glob("*.safetensors"))
    on_disk = sum(p.stat().st_size for p in shards)

    one_stream = read_rate(shards, streams=1)
    all_streams = read_rate(shards, streams=len(shards))

    drop_page_cache()
    torch.cuda.synchronize()
    start = time.perf_counter()
    load_into(model, CheckpointReader(args.folder), torch.bfloat16, device)
    torch.cuda.synchronize()
    load_s = time.perf_counter() - start
    load_rate = on_disk / load_s
    loaded = sum(p.numel() * p.element_size() for p in model.state_dict().values())

    info = header(model=args.model, layers=cfg.num_layers, folder=str(args.folder))
    print(mount)
    rows = {
        "checkpoint_gib": on_disk / GIB,
        "shards": len(shards),
        "loaded_gib": loaded / GIB,
        "generate_s": generate_s,
        "write_s": write_s,
        "write_gib_per_s": on_disk / write_s / GIB,
        "disk_read_1_stream_gib_per_s": one_stream / GIB,
        f"disk_read_{len(shards)}_streams_gib_per_s": all_streams / GIB,
        "load_s": load_s,
        "load_gib_per_s": load_rate / GIB,
        "load_over_disk_1_stream": load_rate / one_stream,
    }
    for key, value in rows.items():
        print(f"{key:>32}: {value:.4g}" if isinstance(value, float) else f"{key:>32}: {value}")
    verdict = "meets" if load_rate >= 0.5 * one_stream else "MISSES"
    print(
        f"RESULT load {on_disk / GIB:.1f} GiB in {load_s:.1f} s = {load_rate / GIB:.2f} GiB/s, "
        f"{100 * load_rate / one_stream:.0f}% of the disk's one-stream {one_stream / GIB:.2f} GiB/s "
        f"({verdict} the 50% goal) on {info['device']}"
    )
    if not args.keep:
        shutil.rmtree(args.folder)


if __name__ == "__main__":
    main()
