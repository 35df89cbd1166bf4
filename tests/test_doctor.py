"""The environment doctor (`python -m wan_exp.doctor`): table and exit status on this
machine, and each diagnosis the seed's users needed: deprecated NCCL names, a flash-attn
build that does not match torch, inert or invalid allocator strings, small /dev/shm,
GPUs that are absent or hidden, and harness workers still running."""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from packaging.requirements import Requirement

from wan_exp.devices import Gpu, NvmlView, visible_gpus
from wan_exp.doctor import FAIL, OK, WARN, diagnose, exit_status
from wan_exp.doctor.allocator import allocator_rows, parse_allocator_conf
from wan_exp.doctor.gpus import gpu_rows
from wan_exp.doctor.software import PACKAGES, version_row
from wan_exp.doctor.system import shm_rows
from wan_exp.doctor.workers import find_workers, worker_rows

# Variables of the calling shell that would change the doctor's verdict.
OWN_PREFIXES = ("NCCL_", "TORCH_NCCL_", "PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "WAN_EXP_")
FAKE_FLASH_ATTN = """\
__version__ = "2.8.3"
raise ImportError(
    "/site-packages/flash_attn_2_cuda.cpython-311-x86_64-linux-gnu.so: "
    "undefined symbol: _ZN3c104cuda9SetDeviceEi"
)
"""


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(OWN_PREFIXES)}
    env.update(extra)
    return env


def run_doctor(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "wan_exp.doctor", *args], env=env, capture_output=True, text=True, timeout=120
    )


def table_rows(table: str) -> dict[str, tuple[str, str]]:
    """CHECK -> (STATUS, VALUE) from the text table (hint lines are indented)."""
    rows = {}
    for line in table.splitlines()[1:]:
        if line and not line.startswith(" "):
            check, status, value = re.split(r"\s{2,}", line, maxsplit=2)
            rows[check] = (status, value)
    return rows


def rows_named(report: dict, check: str) -> list[dict]:
    return [row for row in report["rows"] if row["check"] == check]


# ------------------------------------------------------------------ the command on this machine
def test_doctor_table_on_this_machine():
    proc = run_doctor(env=clean_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout.split("\n\n")[0])
    assert rows["torch"][0] == OK and rows["torch"][1].startswith(torch.__version__)
    for package in PACKAGES:
        assert rows[package] == (OK, importlib.metadata.version(package))
    if torch.cuda.is_available():
        assert rows["GPU 0"][1].startswith(torch.cuda.get_device_name(0))
    else:
        assert rows["GPUs"][0] == OK and rows["GPUs"][1].startswith("none")
        assert rows["CUDA (torch build)"][1].startswith("none") == (torch.version.cuda is None)
    assert proc.stdout.rstrip().endswith("usable (exit status 0)")


@pytest.fixture(scope="module")
def seed_environment(tmp_path_factory):
    """The seed's environment (deprecated NCCL names, its allocator string, a flash-attn whose
    extension does not match torch) with one dummy rank running: the doctor's JSON for it,
    and the dummy rank's PID and job dir."""
    root = tmp_path_factory.mktemp("seed_env")
    (root / "site" / "flash_attn").mkdir(parents=True)
    (root / "site" / "flash_attn" / "__init__.py").write_text(FAKE_FLASH_ATTN)
    job_dir = root / "sweep" / "0"
    (job_dir / "progress").mkdir(parents=True)
    (job_dir / "progress" / "rank_1.json").write_text(
        json.dumps({"rank": 1, "pid": 0, "phase": "wrap", "step": 0, "time": time.time()})
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", "import time; time.sleep(120)"],
        env=clean_env(WAN_EXP_JOB_DIR=str(job_dir), RANK="1", LOCAL_RANK="1"),
    )
    try:
        env = clean_env(
            NCCL_BLOCKING_WAIT="1",
            NCCL_ASYNC_ERROR_HANDLING="1",
            PYTORCH_CUDA_ALLOC_CONF="expandable_segments:True,max_split_size_mb:512",
            PYTHONPATH=os.pathsep.join([str(root / "site"), os.environ.get("PYTHONPATH", "")]),
        )
        proc = run_doctor("--json", env=env)
    finally:
        worker.kill()
        worker.wait()
    report = json.loads(proc.stdout)
    assert proc.returncode == report["exit_status"]
    return SimpleNamespace(report=report, returncode=proc.returncode, worker_pid=worker.pid, job_dir=job_dir)


def test_seed_environment_is_usable_with_warnings(seed_environment):
    assert seed_environment.returncode == 0  # nothing in the seed's environment blocks a run
    assert {row["status"] for row in seed_environment.report["rows"]} == {OK, WARN}


def test_deprecated_nccl_names_are_flagged_with_replacements(seed_environment):
    (blocking,) = rows_named(seed_environment.report, "NCCL_BLOCKING_WAIT")
    assert blocking["status"] == WARN
    assert "use TORCH_NCCL_BLOCKING_WAIT=1" in blocking["hint"] and "watchdog" in blocking["hint"]
    (async_errors,) = rows_named(seed_environment.report, "NCCL_ASYNC_ERROR_HANDLING")
    assert async_errors["status"] == WARN
    assert "use TORCH_NCCL_ASYNC_ERROR_HANDLING=1" in async_errors["hint"]
    assert "watchdog" not in async_errors["hint"]


def test_flash_attn_undefined_symbol_is_diagnosed_as_abi_mismatch(seed_environment):
    (flash,) = rows_named(seed_environment.report, "flash-attn")
    assert flash["status"] == WARN
    assert "undefined symbol: _ZN3c104cuda9SetDeviceEi" in flash["value"]
    assert "another torch version or C++ ABI" in flash["hint"]
    assert f"this torch: {torch.__version__}" in flash["hint"]
    fallback = "sdpa_cudnn" if torch.cuda.is_available() else "sdpa"
    assert f"attention (auto) uses {fallback} instead" in flash["hint"]


def test_seed_allocator_string_is_flagged_inert(seed_environment):
    (allocator,) = rows_named(seed_environment.report, "PYTORCH_CUDA_ALLOC_CONF")
    assert allocator["status"] == WARN
    assert "max_split_size_mb is inert with expandable_segments:True" in allocator["value"]


def test_running_worker_is_listed_then_gone(seed_environment):
    (worker,) = rows_named(seed_environment.report, f"worker PID {seed_environment.worker_pid}")
    assert worker["status"] == OK
    assert worker["value"].startswith(f"rank 1, job dir {seed_environment.job_dir}, phase wrap, step 0")
    assert seed_environment.worker_pid not in [w.pid for w in find_workers()]  # killed by the fixture
    assert [(r.check, r.status, r.value) for r in worker_rows([])] == [("harness workers", OK, "none running")]


def test_worker_scan_skips_rank_children_and_flags_orphans(tmp_path):
    """A /proc-like tree: a rank, a child it started, an orphaned rank, an unrelated process."""

    def process(pid: int, ppid: int, env: dict[str, str]) -> None:
        (tmp_path / str(pid)).mkdir()
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python -m x) S {ppid} {pid} 0 0")
        (tmp_path / str(pid) / "environ").write_bytes(b"".join(f"{k}={v}".encode() + b"\0" for k, v in env.items()))

    process(100, 50, {"WAN_EXP_JOB_DIR": "/sweep/0", "RANK": "0", "PATH": "/bin"})
    process(101, 100, {"WAN_EXP_JOB_DIR": "/sweep/0", "RANK": "0"})  # the rank's own child
    process(200, 1, {"WAN_EXP_JOB_DIR": "/sweep/1", "RANK": "1"})  # its launcher died
    process(300, 1, {"PATH": "/bin"})
    (tmp_path / "self").mkdir()
    workers = find_workers(tmp_path)
    assert [(w.pid, w.rank, w.job_dir) for w in workers] == [(100, "0", "/sweep/0"), (200, "1", "/sweep/1")]
    rows = worker_rows(workers)
    assert [(r.check, r.status) for r in rows] == [("worker PID 100", OK), ("worker PID 200", WARN)]
    assert rows[0].value == "rank 0, job dir /sweep/0"
    assert "orphaned" in rows[1].hint and "kill 200" in rows[1].hint


# ------------------------------------------------------------------ what blocks a run (exit 1)
def test_allocator_string_torch_rejects_fails_the_doctor():
    rows = diagnose(env=clean_env(PYTORCH_ALLOC_CONF="expandable_segment:True"))
    assert exit_status(rows) == 1
    (row,) = [r for r in rows if r.status == FAIL]
    assert row.check == "PYTORCH_ALLOC_CONF" and "unknown key 'expandable_segment'" in row.value
    assert "did you mean 'expandable_segments'?" in row.hint


def test_torch_that_does_not_import_fails_the_doctor(tmp_path):
    (tmp_path / "torch").mkdir()
    (tmp_path / "torch" / "__init__.py").write_text(
        'raise OSError("libcudart.so.12: cannot open shared object file")\n'
    )
    proc = run_doctor(env=clean_env(PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    rows = table_rows(proc.stdout.split("\n\n")[0])
    assert rows["torch"] == (FAIL, "does not import: OSError: libcudart.so.12: cannot open shared object file")
    assert rows["flash-attn"] == (WARN, "not checked: torch does not import")
    assert proc.stdout.rstrip().endswith("NOT usable: fix the FAIL rows (exit status 1)")


def test_missing_or_old_packages():
    hydra = Requirement("hydra-core<1.4,>=1.3")
    assert version_row("hydra-core", None, hydra).status == FAIL
    old = version_row("hydra-core", "1.2.0", hydra)
    assert (old.status, old.hint) == (FAIL, "pip install 'hydra-core<1.4,>=1.3'")
    assert version_row("hydra-core", "1.3.8", hydra).status == OK
    assert version_row("peft", None, Requirement("peft>=0.11")).status == FAIL  # the seed's missing package
    nvml = version_row("nvidia-ml-py", None, Requirement("nvidia-ml-py>=12"))
    assert nvml.status == WARN and "NVML" in nvml.hint


def test_more_gpus_requested_than_visible_fails_the_doctor():
    rows = diagnose(env=clean_env(), required_gpus=1000)
    assert exit_status(rows) == 1
    failing = [r for r in rows if r.status == FAIL]
    assert len(failing) == 1 and "1000" in failing[0].value + failing[0].hint


# ------------------------------------------------------------------ allocator strings
ALLOCATOR_CASES = [
    "expandable_segments:True,max_split_size_mb:512",
    "expandable_segments:False",
    "expandable_segments:true",
    "expandable_segments",
    "max_split_size_mb:20",
    "max_split_size_mb:10",
    "max_split_size_mb:abc",
    "garbage_collection_threshold:0.6",
    "garbage_collection_threshold:1.5",
    "garbage_collection_threshold:0",
    "roundup_power2_divisions:4",
    "roundup_power2_divisions:3",
    "roundup_power2_divisions:[256:1,512:2,>:4]",
    "roundup_power2_divisions:[300:1,>:4]",
    "max_non_split_rounding_mb:64, expandable_segments:True",
    "pinned_use_background_threads:False",
]


def test_allocator_checker_agrees_with_torchs_own_parser():
    """For the device-independent keys, torch's parser runs on a CPU too: every string it
    rejects gets a FAIL from the doctor, and every string it accepts gets none."""
    if not hasattr(torch._C, "_accelerator_setAllocatorSettings"):
        pytest.skip("this torch has no device-independent allocator parser")
    probe = (
        "import json, sys, torch\n"
        "verdicts = []\n"
        "for conf in json.loads(sys.argv[1]):\n"
        "    try:\n"
        "        torch._C._accelerator_setAllocatorSettings(conf)\n"
        "        verdicts.append(True)\n"
        "    except (ValueError, RuntimeError):\n"
        "        verdicts.append(False)\n"
        "print(json.dumps(verdicts))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", probe, json.dumps(ALLOCATOR_CASES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    torch_accepts = json.loads(proc.stdout)
    assert False in torch_accepts and True in torch_accepts
    ours = [not any(f.status == FAIL for f in parse_allocator_conf(conf)[1]) for conf in ALLOCATOR_CASES]
    assert ours == torch_accepts, list(zip(ALLOCATOR_CASES, ours, torch_accepts))


def test_inert_and_conflicting_allocator_settings():
    settings, findings = parse_allocator_conf("garbage_collection_threshold:0.8")
    assert settings == {"garbage_collection_threshold": "0.8"}
    assert [(f.status, f.message) for f in findings] == [
        (WARN, "garbage_collection_threshold is inert without a per-process memory fraction")
    ]
    _, findings = parse_allocator_conf("garbage_collection_threshold:0.8,per_process_memory_fraction:0.9")
    assert findings == []
    _, findings = parse_allocator_conf("backend:cudaMallocAsync,expandable_segments:True")
    assert [f.message for f in findings] == ["backend:cudaMallocAsync ignores expandable_segments"]

    rows = allocator_rows(
        {"PYTORCH_ALLOC_CONF": "expandable_segments:True", "PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:512"},
        torch_version="2.11.0",
    )
    assert [(r.check, r.status) for r in rows] == [
        ("allocator variables", WARN),
        ("PYTORCH_ALLOC_CONF", OK),
        ("PYTORCH_CUDA_ALLOC_CONF", OK),
    ]
    assert rows[0].value == "PYTORCH_ALLOC_CONF and PYTORCH_CUDA_ALLOC_CONF differ"
    # the same string under both names (what the launcher sets) is one row
    same = "expandable_segments:True"
    rows = allocator_rows({"PYTORCH_ALLOC_CONF": same, "PYTORCH_CUDA_ALLOC_CONF": same}, torch_version="2.11.0")
    assert [(r.check, r.status) for r in rows] == [("PYTORCH_ALLOC_CONF & PYTORCH_CUDA_ALLOC_CONF", OK)]
    rows = allocator_rows({"PYTORCH_ALLOC_CONF": same}, torch_version="2.8.0")
    assert (rows[0].status, rows[0].value) == (WARN, "torch 2.8.0 does not read PYTORCH_ALLOC_CONF")


# ------------------------------------------------------------------ GPUs (NVML answers given)
def make_gpu(index: int, used_gib: float = 0.5, pids: tuple[int, ...] = ()) -> Gpu:
    return Gpu(index, "NVIDIA H200", f"GPU-{index}aa{index}", int(used_gib * 2**30), 141 * 2**30, 0, list(pids))


def test_cuda_visible_devices_order_uuids_and_bad_entries():
    gpus = [make_gpu(i) for i in range(4)]
    assert visible_gpus(gpus, None) == (gpus, None)
    assert visible_gpus(gpus, "2,GPU-0aa") == ([gpus[2], gpus[0]], None)
    assert visible_gpus(gpus, "1,7,0") == ([gpus[1]], "7")  # CUDA stops at the first bad entry
    assert visible_gpus(gpus, "1,1") == ([gpus[1]], "1")
    assert visible_gpus(gpus, "") == ([], "")

    rows, visible = gpu_rows(NvmlView(gpus, "12.8"), {"CUDA_VISIBLE_DEVICES": "1,7"}, "12.8", required_gpus=0)
    assert visible == [gpus[1]]
    (cvd,) = [r for r in rows if r.check == "CUDA_VISIBLE_DEVICES"]
    assert cvd.status == FAIL and "'7' names no GPU" in cvd.value
    assert [r.value.endswith("(hidden by CUDA_VISIBLE_DEVICES)") for r in rows if r.check.startswith("GPU ")] == [
        True,
        False,
        True,
        True,
    ]
    rows, visible = gpu_rows(NvmlView(gpus, "12.8"), {"CUDA_VISIBLE_DEVICES": "-1"}, "12.8", required_gpus=0)
    assert visible == [] and exit_status(rows) == 0  # hiding every GPU on purpose is fine


# what CUDA exposes of two GPUs, written out by hand for each CUDA_VISIBLE_DEVICES value
VISIBLE_OF_TWO = [
    (None, 2),
    ("0,0", 1),
    ("1,0", 2),
    ("GPU-1aa1", 1),
    ("GPU-1aa1,0", 2),
    ("", 0),
    ("-1", 0),
    ("0,-1,1", 1),
    ("7", 0),
]


@pytest.mark.parametrize("cvd,expected", VISIBLE_OF_TWO, ids=[repr(v) for v, _ in VISIBLE_OF_TWO])
def test_the_job_and_the_doctor_count_the_same_visible_gpus(cvd, expected):
    """One rule: the rank count of a job (nproc_per_node=auto) and the doctor's table."""
    from wan_exp.config import ExperimentConfig
    from wan_exp.devices import visible_gpu_count
    from wan_exp.preflight import ranks_per_node

    nvml = NvmlView([make_gpu(0), make_gpu(1)], "12.8")
    env = {} if cvd is None else {"CUDA_VISIBLE_DEVICES": cvd}
    count = visible_gpu_count(nvml, env)
    assert count == expected
    _, doctor_visible = gpu_rows(nvml, env, "12.8", required_gpus=0)
    assert len(doctor_visible) == expected
    cfg = OmegaConf.structured(ExperimentConfig)
    cfg.parallel.name, cfg.parallel.ulysses_degree = "ulysses", -1  # the degree makes it ulysses
    assert ranks_per_node(cfg, count) == (expected or 2)  # no visible GPU: 2 CPU ranks


def test_no_driver_counts_no_gpu():
    from wan_exp.devices import visible_gpu_count

    assert visible_gpu_count(NvmlView([], None, error="no NVIDIA driver"), {"CUDA_VISIBLE_DEVICES": "0"}) == 0


def test_busy_gpu_old_driver_and_missing_gpus():
    gpus = [make_gpu(0, used_gib=60, pids=(4242,)), make_gpu(1)]
    rows, _ = gpu_rows(NvmlView(gpus, "12.4"), {}, "13.0", required_gpus=4)
    by_check = {r.check: r for r in rows}
    assert by_check["GPU 0"].status == WARN and "4242" in by_check["GPU 0"].hint
    assert by_check["GPU 1"].status == OK
    assert by_check["NVIDIA driver"].status == FAIL and "torch needs CUDA 13.0" in by_check["NVIDIA driver"].value
    assert by_check["requested GPUs"].status == FAIL and by_check["requested GPUs"].value == "--gpus 4, 2 visible"
    rows, _ = gpu_rows(NvmlView(gpus, "12.8"), {}, "12.9", required_gpus=2)
    assert [r.status for r in rows if r.check == "NVIDIA driver"] == [WARN]  # minor-version compatibility
    rows, _ = gpu_rows(NvmlView([], None, error="no NVIDIA driver"), {}, None, required_gpus=1)
    assert [(r.check, r.status) for r in rows] == [("GPUs", FAIL)]


# ------------------------------------------------------------------ /dev/shm
@pytest.mark.parametrize("env, status", [({}, WARN), ({"NCCL_SHM_DISABLE": "1"}, OK)])
def test_small_dev_shm_warns_unless_nccl_keeps_off_it(monkeypatch, env, status):
    docker_default = os.statvfs_result((4096, 4096, 64 * 2**20 // 4096, 16384, 16384, 0, 0, 0, 0, 255))
    monkeypatch.setattr("wan_exp.doctor.system.os.statvfs", lambda path: docker_default)
    (row,) = shm_rows(env)
    assert (row.status, row.value) == (status, "0.06 GiB (0.06 GiB free)")
    if status == WARN:
        assert "--shm-size" in row.hint and "NCCL_SHM_DISABLE=1" in row.hint
