"""Read an offline W&B run (``run-<id>.wandb``) back: config, history, summary (for the tests:
the package writes runs and never reads them).

Offline runs keep everything in one file and write no ``wandb-summary.json``
(docs/facts.md §4b). The file uses the LevelDB log format:

- a 7-byte header: ``:W&B``, a 2-byte magic (0xBEE1, little-endian) and a version byte;
- then 32 KiB blocks; the header counts as part of the first block;
- each record chunk: CRC32 (4 bytes, little-endian; IEEE CRC of the type byte followed
  by the data), data length (2 bytes), type (1 byte: 1 full, 2 first, 3 middle, 4 last),
  then the data; a chunk never crosses a block end, and fewer than 7 bytes left in a
  block are zero padding;
- a full chunk, or first + middles + last joined, is one serialised
  ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

from wandb.proto import wandb_internal_pb2

HEADER = b":W&B" + struct.pack("<H", 0xBEE1) + b"\x00"
BLOCK_SIZE = 32 * 1024
CHUNK_HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


class WandbFileError(ValueError):
    """The file is not a W&B offline run file or is damaged; the message says where."""


@dataclass
class OfflineRun:
    """What a run file holds, as plain Python values."""

    config: dict[str, Any] = field(default_factory=dict)
    history: list[dict[str, Any]] = field(default_factory=list)  # one dict per logged step
    summary: dict[str, Any] = field(default_factory=dict)
    group: str = ""
    job_type: str = ""
    run_id: str = ""


def iter_records(path: Path) -> Iterator[bytes]:
    """Yield each serialised Record of a ``run-<id>.wandb`` file, CRC-checked."""
    data = Path(path).read_bytes()
    if data[: len(HEADER) - 1] != HEADER[:-1]:
        raise WandbFileError(f"{path}: not a W&B run file (header {data[:7]!r}, expected {HEADER!r})")
    pos = len(HEADER)
    pending = b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK_SIZE - pos % BLOCK_SIZE
        if left_in_block < CHUNK_HEADER:  # zero padding at the end of a block
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zeroed tail of a file closed mid-block
            break
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if zlib.crc32(bytes([kind]) + chunk) & 0xFFFFFFFF != crc:
            raise WandbFileError(f"{path}: CRC mismatch in the chunk at byte {pos}")
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield chunk
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield pending + chunk
            pending = b""
        else:
            raise WandbFileError(f"{path}: unknown chunk type {kind} at byte {pos}")


def _item_key(item: Any) -> str:
    return item.key or "/".join(item.nested_key)


def read_run(path: Path) -> OfflineRun:
    """Config, history and summary of one offline run file (later updates win)."""
    run = OfflineRun()
    for raw in iter_records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(raw)
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.group, run.job_type = record.run.run_id, record.run.run_group, record.run.job_type
            for item in record.run.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "config":
            for item in record.config.update:
                run.config[_item_key(item)] = json.loads(item.value_json)
        elif kind == "history":
            run.history.append({_item_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_item_key(item)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(_item_key(item), None)
    # wandb stores each config value as {"value": ..., "desc": ...}
    run.config = {k: v["value"] if isinstance(v, dict) and "value" in v else v for k, v in run.config.items()}
    return run


def find_run_file(job_dir: Path) -> Path:
    """The single ``run-<id>.wandb`` under a job dir's ``wandb/`` folder."""
    files = sorted(Path(job_dir).glob("wandb/*run-*/run-*.wandb"))
    if len(files) != 1:
        raise FileNotFoundError(f"expected one W&B run file under {job_dir}/wandb/, found {len(files)}: {files}")
    return files[0]
