"""The link model (wan_exp/plan/pricing.py) against times worked out by hand: sourced curves
(latency + bus bytes / bandwidth), a measured nccl-tests curve (bus bandwidth interpolated in
the message size), full-duplex point-to-point, the overlap range; the plan's fits verdict and
code-version keyed rows (wan_exp/plan/run.py); and ``python -m wan_exp.linkbench`` on 2 gloo
ranks under torchrun, its file read back through the parser."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from statistics import median

import pytest
from omegaconf import OmegaConf

from launch_helpers import REPO, torchrun
from wan_exp.config import ConfigError, compose_config
from wan_exp.plan.pricing import (
    LINKS,
    CurveFileError,
    Link,
    comm_time_s,
    comm_times_s,
    overlap_of,
    parse_link,
    predict_step,
    read_curve_file,
)

GIB = 2**30

# an all_reduce_perf table as nccl-tests prints it (2 sizes in between, out-of-place then in-place)
ALL_REDUCE_TABLE = """\
# nThread 1 nGpus 1 minBytes 1024 maxBytes 1073741824 step: 1024(factor) warmup iters: 5 iters: 20
# Collective test starting: all_reduce_perf
#
#                                                              out-of-place                       in-place
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
#        (B)    (elements)                               (us)  (GB/s)  (GB/s)            (us)  (GB/s)  (GB/s)
        1024           256     float     sum      -1    10.00    0.10    0.15      0    11.00    0.09    0.14      0
     1048576        262144     float     sum      -1   100.00   10.49   15.00      0   101.00   10.38   14.90      0
  1073741824     268435456     float     sum      -1  10000.0  107.37  150.00      0  10001.0  107.36  149.99      0
# Out of bounds values : 0 OK
# Avg bus bandwidth    : 55.05
"""
SENDRECV_TABLE = """\
# Collective test starting: sendrecv_perf
#       size         count      type   redop    root     time   algbw   busbw #wrong     time   algbw   busbw #wrong
        4096          1024     float     sum      -1    20.00    0.20    0.20      0    20.00    0.20    0.20    N/A
     4194304       1048576     float     sum      -1   200.00   20.97   20.00      0   200.00   20.97   20.00    N/A
"""


# ----------------------------------------------------------------------------- curves
def test_sourced_curves_are_latency_plus_bus_bytes_over_bandwidth():
    nvlink4 = LINKS["nvlink4"]
    # a 64 MiB all-to-all on 8 ranks: bus bytes 64 MiB x 7/8, 6 us + that / 335 GB/s
    size = 64 * 2**20
    bus = size * 7 / 8
    expected = 6e-6 + bus / 335e9
    assert nvlink4.time_s("all_to_all", {"count": 1, "bytes": size, "bus_bytes": bus}) == pytest.approx(expected)
    # nccl-tests' busbw at that size: bus bytes / time, below the 335 GB/s peak, nearing it with size
    assert nvlink4.curve("all_to_all").bus_gbps_at(size, 7 / 8) == pytest.approx(bus / expected / 1e9)
    assert (
        nvlink4.curve("all_to_all").bus_gbps_at(1024, 7 / 8) < 1 < nvlink4.curve("all_to_all").bus_gbps_at(size, 7 / 8)
    )
    # every kind of every link has a curve and a stated source
    for link in LINKS.values():
        for kind in ("all_reduce", "all_gather", "reduce_scatter", "all_to_all", "send", "recv", "broadcast"):
            assert link.curve(kind).source
    # several calls at their mean size, when the record has no per-size messages
    calls = {"count": 4, "bytes": 4 * size, "bus_bytes": 4 * bus}
    assert nvlink4.time_s("all_to_all", calls) == pytest.approx(4 * expected)


def test_a_measured_curve_interpolates_bus_bandwidth_in_the_message_size(tmp_path):
    curve_file = tmp_path / "mine.txt"
    curve_file.write_text(ALL_REDUCE_TABLE + SENDRECV_TABLE)
    curves = read_curve_file(curve_file)
    assert sorted(curves) == ["all_reduce", "send_recv"]
    all_reduce = curves["all_reduce"]
    assert all_reduce.sizes == (1024, 1048576, 1073741824)  # the out-of-place columns
    assert all_reduce.times_s == pytest.approx((10e-6, 100e-6, 10000e-6))
    assert all_reduce.bus_gbps == (0.15, 15.0, 150.0)
    # halfway between 1 KiB and 1 MiB: busbw (0.15 + 15) / 2 = 7.575 GB/s; 4 ranks (x 1.5)
    middle = 1024 + (1048576 - 1024) // 2
    assert all_reduce.bus_gbps_at(middle) == pytest.approx(7.575)
    assert all_reduce.time_s(middle, middle * 1.5) == pytest.approx(middle * 1.5 / 7.575e9)
    # below the smallest size: the smallest row's time; above the largest: its bus bandwidth
    assert all_reduce.time_s(512, 768) == pytest.approx(10e-6)
    assert all_reduce.time_s(2**31, 2**31 * 1.5) == pytest.approx(2**31 * 1.5 / 150e9)
    # through launcher.link: kinds the file lacks borrow the all-reduce curve, and say so
    link = parse_link(str(curve_file))
    assert (
        link.curve("all_gather") == link.curve("all_reduce") == all_reduce and link.curve("send") == curves["send_recv"]
    )
    assert "all_gather, reduce_scatter, all_to_all" in link.notes[0]
    # a step's calls priced per recorded message size
    per_step = {
        "all_reduce": {
            "count": 3,
            "bytes": 2 * middle + 512,
            "bus_bytes": 1.5 * (2 * middle + 512),
            "messages": {f"{middle}x1.5": 2, "512x1.5": 1},
        }
    }
    assert comm_time_s(per_step, link) == pytest.approx(2 * middle * 1.5 / 7.575e9 + 10e-6)


def test_a_curve_file_named_after_its_test_and_bad_files(tmp_path):
    named = tmp_path / "alltoall_perf_8gpu.log"
    named.write_text(ALL_REDUCE_TABLE.replace("# Collective test starting: all_reduce_perf\n", ""))
    assert list(read_curve_file(named)) == ["all_to_all"]
    unnamed = tmp_path / "curve.txt"
    unnamed.write_text(ALL_REDUCE_TABLE.replace("# Collective test starting: all_reduce_perf\n", ""))
    with pytest.raises(CurveFileError, match="which collective is it"):
        read_curve_file(unnamed)
    empty = tmp_path / "empty_perf.txt"
    empty.write_text("# nothing measured\n")
    with pytest.raises(ConfigError, match=r"launcher.link=.*no nccl-tests rows"):
        parse_link(str(empty))
    with pytest.raises(ConfigError, match="is not a link; use one of nvlink4"):
        parse_link(str(tmp_path / "absent.txt"))


def test_send_and_receive_of_a_step_count_once_full_duplex():
    toy = Link.uniform("toy", 1.0, 0.0, "1 GB/s, no latency")
    sends = {"count": 4, "bytes": 4e8, "bus_bytes": 4e8}
    receives = {"count": 4, "bytes": 3e8, "bus_bytes": 3e8}
    # 0.4 s of sends while 0.3 s of receives arrive: 0.4 s, not 0.7
    assert comm_time_s({"send": sends, "recv": receives}, toy) == pytest.approx(0.4)
    assert comm_time_s(
        {"send": sends, "recv": receives, "all_to_all": {"count": 1, "bytes": 2e8, "bus_bytes": 1e8}}, toy
    ) == pytest.approx(0.5)


def test_overlap_range_on_a_toy_exchange():
    """1 s of compute; a ring exchange of 0.4 s per direction and a 0.1 s all-to-all at 1 GB/s:
    serial 1.5 s, overlapped max(1, 0.4) + 0.1 = 1.1 s; the code overlaps the ring (no autograd)."""
    toy = Link.uniform("toy", 1.0, 0.0, "1 GB/s, no latency")
    per_step = {
        "send": {"count": 1, "bytes": 4e8, "bus_bytes": 4e8},
        "recv": {"count": 1, "bytes": 4e8, "bus_bytes": 4e8},
        "all_to_all": {"count": 1, "bytes": 2e8, "bus_bytes": 1e8},
    }
    ring = overlap_of({"parallel": {"ring_degree": 2, "ulysses_degree": 2}, "workload": {"name": "generate"}})
    assert ring.kinds == ("send", "recv") and ring.mode == "overlapped" and "K/V" in ring.reason
    assert comm_times_s(per_step, toy, ring.kinds) == pytest.approx((0.4, 0.1))
    prediction = predict_step(
        {
            "step_times_s": [1.2, 1.0, 0.9],
            "step_time_s_median": median([1.2, 1.0, 0.9]),
            "comm": {"per_step": per_step},
        },
        toy,
        ring,
    )
    assert prediction["compute_s"] == 1.0 and (prediction["compute_min_s"], prediction["compute_max_s"]) == (0.9, 1.2)
    assert prediction["measured_steps"] == 3
    assert prediction["step_serial_s"] == pytest.approx(1.5)
    assert prediction["step_overlapped_s"] == pytest.approx(1.1)
    assert prediction["step_s"] == prediction["step_overlapped_s"] and prediction["overlap"] == "overlapped"
    # comm longer than compute: the overlapped step is the comm's
    slow = predict_step(
        {"step_times_s": [0.2], "step_time_s_median": median([0.2]), "comm": {"per_step": per_step}}, toy, ring
    )
    assert slow["step_overlapped_s"] == pytest.approx(0.4 + 0.1)
    # under autograd the ring blocks; Ulysses and CFG block; FSDP's all-gathers overlap
    assert overlap_of({"parallel": {"ring_degree": 2}, "workload": {"name": "train_lora"}}).mode == "serial"
    serial = predict_step(
        {"step_times_s": [1.0], "step_time_s_median": median([1.0]), "comm": {"per_step": per_step}},
        toy,
        overlap_of({"parallel": {"ulysses_degree": 4}, "workload": {"name": "generate"}}),
    )
    assert serial["step_s"] == serial["step_serial_s"] == pytest.approx(1.5) and serial["overlap"] == "serial"
    for preset in ("fsdp_fixed", "hybrid"):  # the presets as composed: FSDP on by its degree
        composed = OmegaConf.to_container(compose_config([f"parallel={preset}"]), resolve=True)
        assert overlap_of(composed).kinds[-1] == "all_gather", preset
    assert overlap_of(OmegaConf.to_container(compose_config(["parallel=ulysses"]), resolve=True)).kinds == ()


# ----------------------------------------------------------------------------- the plan's rows
def test_fits_verdict_counts_the_cuda_context_nccl_buffers_and_a_margin():
    from wan_exp.plan.run import CUDA_CONTEXT_BYTES, row_from_results

    results = {
        "status": "completed",
        "job_dir": "x",
        "config": {"nccl": {"env": {"NCCL_BUFFSIZE": str(8 << 20), "NCCL_MAX_NCHANNELS": "16"}}},
        "prediction": None,
        "ranks": [
            {
                "memory": {"peak_reserved_gib": 60.0},
                "stages": {},
                "comm": {"per_step": {"all_to_all": {"count": 1, "bytes": 8, "bus_bytes": 7}}},
            }
        ],
    }
    row = row_from_results("ulysses", 8, results, [64.0, 80.0], fragmentation=0.05)
    # context 287,047,680 B; margin 5 % of 60; NCCL, per channel and peer (the ring's + 7 all-to-all
    # peers): receive buffers LL 0.5 MiB + LL128 4.6875 MiB + SIMPLE 8 MiB = 13.1875 -> 14 MiB in
    # 2 MiB granules, + a 2 MiB send header: 16 MiB x 8 peers x 16 channels = 2 GiB
    assert row.context_gib == pytest.approx(CUDA_CONTEXT_BYTES / GIB) and CUDA_CONTEXT_BYTES == 287_047_680
    assert row.nccl_gib == 16 * 8 * 16 / 1024 == 2.0
    assert row.margin_gib == pytest.approx(3.0)
    assert row.need_gib == pytest.approx(60 + CUDA_CONTEXT_BYTES / GIB + 2.0 + 3.0)
    assert row.fits == {"64": False, "80": True}  # 65.27 GiB needed: the bare 60 GiB peak would have fit 64
    # the defaults (4 MiB SIMPLE: 9.1875 -> 10 MiB + 2 MiB, 32 channels) on 8 GPUs with an all-to-all:
    # 3 GiB = 3.22 GB, against the 3.28 GB (1.06 -> 4.34 GB) NCCL took for PyTorch's first
    # all_to_all_single on 8 H100s (https://github.com/NVIDIA/nccl/issues/1685)
    results["config"] = {}
    assert row_from_results("ulysses", 8, results, [64.0]).nccl_gib * GIB == 32 * 8 * (12 << 20)
    assert 32 * 8 * (12 << 20) == pytest.approx((4.34 - 1.06) * 1e9, rel=0.05)
    # no point-to-point: the ring's neighbour only; one GPU: no NCCL
    results["ranks"][0]["comm"]["per_step"] = {"all_gather": {"count": 1, "bytes": 8, "bus_bytes": 6}}
    assert row_from_results("fsdp_fixed", 4, results, [64.0]).nccl_gib == 32 * 12 / 1024
    assert row_from_results("single", 1, results, [64.0]).nccl_gib == 0
    # the CPU (host RSS, gloo): only the margin
    results["ranks"][0]["memory"] = {"peak_host_rss_gib": 10.0}
    cpu = row_from_results("ulysses", 4, results, [10.4, 10.6], fragmentation=0.05)
    assert (cpu.context_gib, cpu.nccl_gib, cpu.margin_gib) == (0.0, 0.0, pytest.approx(0.5))
    assert cpu.fits == {"10.4": False, "10.6": True}


def test_kept_rows_are_refused_when_the_code_version_differs(tmp_path):
    from wan_exp.plan.run import (
        CODE_VERSION_FILE,
        code_version,
        earlier_results,
        stale_code,
    )

    overrides = ["model=tiny", "parallel=single"]
    sweep = tmp_path / "single_1"
    (sweep / "0").mkdir(parents=True)
    (sweep / "0" / "results.json").write_text(json.dumps({"status": "completed", "overrides": overrides}))
    version = code_version()
    assert len(version) == 16 and version == code_version()
    # no recorded version (a plan of older code): run again
    assert earlier_results(overrides, sweep, version) == (None, True)
    assert "not recorded" in stale_code(sweep, version)
    (sweep / CODE_VERSION_FILE).write_text("0123456789abcdef\n")
    assert earlier_results(overrides, sweep, version) == (None, True)
    assert stale_code(sweep, version) == f"ran code version 0123456789abcdef, now {version}; it runs again"
    (sweep / CODE_VERSION_FILE).write_text(version + "\n")
    results, clear = earlier_results(overrides, sweep, version)
    assert results["status"] == "completed" and clear is False
    # the version follows the source: a copy of the tree with one byte changed hashes otherwise
    tree = tmp_path / "tree"
    (tree / "wan_exp").mkdir(parents=True)
    (tree / "wan_exp" / "a.py").write_text("x = 1\n")
    before = code_version(tree)
    (tree / "wan_exp" / "a.py").write_text("x = 2\n")
    assert code_version(tree) != before


# ----------------------------------------------------------------------------- linkbench
def test_linkbench_on_two_gloo_ranks_writes_a_curve_the_parser_reads(tmp_path):
    out = tmp_path / "curve.txt"
    proc = torchrun(
        2,
        "-m",
        "wan_exp.linkbench",
        "--min-bytes",
        "1K",
        "--max-bytes",
        "16K",
        "--iters",
        "3",
        "--warmup",
        "1",
        "--out",
        str(out),
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    curves = read_curve_file(out)
    assert sorted(curves) == ["all_gather", "all_reduce", "all_to_all", "reduce_scatter", "send_recv"]
    for kind, curve in curves.items():
        assert curve.sizes == (1024, 2048, 4096, 8192, 16384), kind  # multiples of 2 ranks x 4 B
        factor = {"all_reduce": 1.0, "send_recv": 1.0}.get(kind, 0.5)  # 2(n-1)/n, (n-1)/n at n = 2
        for size, time_s, busbw in zip(curve.sizes, curve.times_s, curve.bus_gbps):
            # busbw = size x factor / time, as printed (2 decimals of GB/s, time to 0.01 us)
            assert busbw == pytest.approx(size * factor / time_s / 1e9, abs=0.006 + busbw * 1e-3), (kind, size)
    assert "wan_exp.linkbench" in out.read_text().splitlines()[0]
    assert parse_link(str(out)).name == "measured curve.txt"


def test_linkbench_refuses_bad_arguments_and_a_missing_torchrun():
    from wan_exp import linkbench

    with pytest.raises(SystemExit):
        linkbench.parse_args(["--max-bytes", "12Q"])
    with pytest.raises(SystemExit):
        linkbench.parse_args(["--collectives", "all_reduce,broadcast"])
    env = {k: v for k, v in os.environ.items() if k != "RANK"}
    proc = subprocess.run(
        [sys.executable, "-m", "wan_exp.linkbench"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 2 and "start it under torchrun" in proc.stderr


def test_the_plan_takes_a_curve_file_relative_to_where_it_runs(tmp_path, monkeypatch):
    from wan_exp.plan.run import job_overrides, parse_args

    (tmp_path / "curves").mkdir()
    (tmp_path / "curves" / "all_reduce_perf.txt").write_text(ALL_REDUCE_TABLE)
    monkeypatch.chdir(tmp_path)
    args = parse_args(["model=tiny", "link=curves/all_reduce_perf.txt"])
    # the jobs run from the repository: they get the file's absolute path
    assert args.link == str(tmp_path / "curves" / "all_reduce_perf.txt")
    assert f"launcher.link={tmp_path / 'curves' / 'all_reduce_perf.txt'}" in job_overrides(args, "ulysses", 2)
    with pytest.raises(ConfigError, match="is not a link"):
        parse_args(["link=curves/none.txt"])
