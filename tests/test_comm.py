"""Communication counting (wan_exp/metrics/comm.py) against counts and bytes worked out by
hand, on torch's fake process group (4 ranks played by this one process: collectives
return without moving data, the counter still sees every call), plus the rank record and
the job summary. The counts of real gloo runs (Ulysses x ring, CFG x ring) are checked in
tests/dist/split_equivalence.py."""

from __future__ import annotations

import json

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from launch_helpers import REPO, torchrun
from wan_exp.metrics.collector import MetricsCollector
from wan_exp.metrics.comm import CommCounter
from wan_exp.metrics.summary import rank_figures, summarize

WORLD = 4  # ranks of the fake process group (conftest's fake_group)
F32 = 4


def _totals(kinds: dict) -> dict:
    """count/bytes/bus_bytes per kind (the per-size ``messages`` checked on their own below)."""
    return {kind: {k: v for k, v in figures.items() if k != "messages"} for kind, figures in kinds.items()}


def test_every_collective_kind_counts_its_bytes_as_documented(fake_group):
    counter = CommCounter()
    pair = dist.new_group([0, 1])
    with counter:
        dist.all_reduce(torch.ones(10))  # 40 B, x 2*3/4
        dist.all_reduce(torch.ones(6, dtype=torch.bfloat16), group=pair)  # 12 B, x 2*1/2
        dist.all_gather_into_tensor(torch.empty(4 * 5), torch.ones(5))  # output 80 B, x 3/4
        dist.reduce_scatter_tensor(torch.empty(3), torch.ones(4 * 3))  # input 48 B, x 3/4
        dist.all_to_all_single(torch.empty(8), torch.ones(8))  # input 32 B, x 3/4
        dist.broadcast(torch.ones(7), src=0)  # 28 B, x 1
        dist.send(torch.ones(2, 3), dst=1)  # 24 B
        dist.recv(torch.empty(5), src=3)  # 20 B
        dist.barrier()
    assert _totals(counter.counts["other"]) == {
        "all_reduce": {"count": 2, "bytes": 40 + 12, "bus_bytes": 40 * 1.5 + 12 * 1.0},
        "all_gather": {"count": 1, "bytes": 80, "bus_bytes": 60.0},
        "reduce_scatter": {"count": 1, "bytes": 48, "bus_bytes": 36.0},
        "all_to_all": {"count": 1, "bytes": 32, "bus_bytes": 24.0},
        "broadcast": {"count": 1, "bytes": 28, "bus_bytes": 28.0},
        "send": {"count": 1, "bytes": 24, "bus_bytes": 24.0},
        "recv": {"count": 1, "bytes": 20, "bus_bytes": 20.0},
        "barrier": {"count": 1, "bytes": 0, "bus_bytes": 0.0},
    }


def test_collectives_inside_fsdp2_and_dtensor_are_counted(fake_group):
    """Linear(8, 8) under fully_shard over 4 ranks: each rank holds 2 rows of the weight
    and 2 of the bias = 18 floats. Forward: one all-gather of 4 x 18 floats (the root stays
    unsharded for backward); backward: one reduce-scatter of the 72-float gradient.
    DTensor's full_tensor() of an (8, 3) tensor sharded on dim 0: a functional all-gather
    of 4 x 2 x 3 floats."""
    from torch.distributed.tensor import Shard, distribute_tensor

    counter = CommCounter()
    with counter:
        mesh = init_device_mesh("cpu", (WORLD,))
        layer = torch.nn.Linear(8, 8)
        fully_shard(layer, mesh=mesh)
        with counter.in_bucket("step"):
            layer(torch.ones(2, 8)).sum().backward()
        sharded = distribute_tensor(torch.ones(8, 3), mesh, [Shard(0)], src_data_rank=None)
        with counter.in_bucket("warmup"):
            sharded.full_tensor()
    assert _totals(counter.counts["step"]) == {
        "all_gather": {"count": 1, "bytes": 72 * F32, "bus_bytes": 72 * F32 * 3 / 4},
        "reduce_scatter": {"count": 1, "bytes": 72 * F32, "bus_bytes": 72 * F32 * 3 / 4},
    }
    assert _totals(counter.counts["warmup"]) == {"all_gather": {"count": 1, "bytes": 24 * F32, "bus_bytes": 18 * F32}}


def test_collector_buckets_calls_by_phase_and_step_into_the_rank_record(fake_group):
    collector = MetricsCollector("cpu", 0, WORLD)
    with collector.comm:
        with collector.phase("wrap"):
            dist.broadcast(torch.ones(4), src=0)
        with collector.phase("encode"):
            dist.all_reduce(torch.ones(1))
        with collector.phase("first_step"), collector.step(measured=False):
            dist.all_to_all_single(torch.empty(4), torch.ones(4))
        for _ in range(2):
            with collector.step(measured=True):
                dist.all_to_all_single(torch.empty(8), torch.ones(8))
                dist.all_to_all_single(torch.empty(8), torch.ones(8))
    dist.all_reduce(torch.ones(3))  # outside the counting window: not counted
    comm = collector.rank_record()["comm"]
    assert _totals(comm["init"]) == {"broadcast": {"count": 1, "bytes": 16, "bus_bytes": 16.0}}
    assert _totals(comm["other"]) == {"all_reduce": {"count": 1, "bytes": 4, "bus_bytes": 6.0}}
    assert _totals(comm["warmup"]) == {"all_to_all": {"count": 1, "bytes": 16, "bus_bytes": 12.0}}
    assert _totals(comm["step"]) == {"all_to_all": {"count": 4, "bytes": 128, "bus_bytes": 96.0}}
    assert comm["measured_steps"] == 2
    assert _totals(comm["per_step"]) == {"all_to_all": {"count": 2, "bytes": 64, "bus_bytes": 48.0}}
    record = collector.rank_record()  # the derived totals, summed over the kinds once, in the record
    assert record["comm_step_totals"] == {"count": 2, "bytes": 64, "bus_bytes": 48.0}
    assert record["comm_init_totals"] == {"count": 1, "bytes": 16, "bus_bytes": 16.0}


def _record(rank: int, step_bytes: int | None, init_bytes: int) -> dict:
    """A rank record as MetricsCollector.rank_record() lays it out (its derived figures
    included); step_bytes None: no measured step (workload=init)."""
    per_step = (
        None if step_bytes is None else {"all_to_all": {"count": 3, "bytes": step_bytes, "bus_bytes": step_bytes / 2}}
    )
    record = {
        "rank": rank,
        "world_size": 2,
        "device_name": "cpu",
        "step_times_s": [] if per_step is None else [1.0],
        "init_phases_s": {},
        "memory": {"peak_host_rss_gib": 1.0},
        "workload": {},
        "comm": {
            "per_step": per_step,
            "init": {"broadcast": {"count": 1, "bytes": init_bytes, "bus_bytes": init_bytes}},
        },
    }
    return {**record, **rank_figures(record["step_times_s"], record["init_phases_s"], record["comm"])}


def test_summary_reports_the_busiest_rank():
    summary = summarize([_record(0, 100, 7), _record(1, 300, 5)], {"model": {"dtype": "bf16"}})
    assert summary["comm_step_bytes_max"] == 300
    assert summary["comm_step_bus_bytes_max"] == 150
    assert summary["comm_step_calls_max"] == 3
    assert summary["comm_init_bytes_max"] == 7
    assert summary["comm_init_calls_max"] == 1


def test_a_job_without_measured_steps_has_no_comm_per_step():
    record = _record(0, None, 7)  # workload=init
    assert record["comm_step_totals"] is None and record["comm_init_totals"] == {"count": 1, "bytes": 7, "bus_bytes": 7}
    summary = summarize([record], {"model": {"dtype": "bf16"}})
    assert summary["comm_step_bytes_max"] is None and summary["comm_init_bytes_max"] == 7


def test_a_bucket_name_outside_the_list_is_refused():
    with pytest.raises(ValueError, match="comm bucket 'steps' is not one of"):
        with CommCounter().in_bucket("steps"):
            pass


def test_compiled_code_still_compiles_and_its_collectives_are_counted(fake_group):
    """model.compile=true must not fall back to eager under the counter (dynamo skips frames
    under a dispatch mode unless it ignores compile internals), and a collective inside the
    compiled graph is still counted once per call."""
    import torch._dynamo
    import torch.distributed._functional_collectives as funcol

    graphs = []

    def backend(graph_module, example_inputs):
        graphs.append(graph_module)
        return torch._dynamo.backends.debugging.aot_eager(graph_module, example_inputs)

    torch._dynamo.reset()
    fn = torch.compile(lambda x: funcol.all_reduce(x * 2, "sum", dist.group.WORLD) + 1, backend=backend)
    counter = CommCounter()
    with counter:
        for _ in range(2):
            fn(torch.ones(5))
    assert len(graphs) == 1
    assert _totals(counter.counts["other"]) == {"all_reduce": {"count": 2, "bytes": 40, "bus_bytes": 60.0}}


def test_uneven_all_to_all_counts_exact_bus_bytes(fake_group):
    """Rank 0 of 4 sends rows [4, 1, 2, 3] of a (10, 3) float tensor: it keeps its own 4 rows
    (48 B), so 120 - 48 = 72 B cross the link, not 120 x 3/4 = 90."""
    counter = CommCounter()
    with counter:
        dist.all_to_all_single(
            torch.empty(10, 3), torch.ones(10, 3), output_split_sizes=[4, 1, 2, 3], input_split_sizes=[4, 1, 2, 3]
        )
        dist.all_to_all(
            [torch.empty(n) for n in (2, 3, 4, 5)], [torch.ones(n) for n in (2, 3, 4, 5)]
        )  # keeps 8 B of 56
        torch.ops._c10d_functional.wait_tensor(
            torch.ops._c10d_functional.all_to_all_single(
                torch.ones(10, 3), [4, 1, 2, 3], [1, 2, 3, 4], dist.group.WORLD.group_name
            )
        )  # keeps 1 row, 12 B
    assert _totals(counter.counts["other"]) == {
        "all_to_all": {"count": 3, "bytes": 120 + 56 + 120, "bus_bytes": 72.0 + 48.0 + 108.0}
    }
    assert counter.counts["other"]["all_to_all"]["messages"] == {"120x0.6": 1, "56x0.857143": 1, "120x0.9": 1}


def test_the_functional_reduce_scatter_with_out_is_counted(fake_group):
    counter = CommCounter()
    out = torch.empty(3)
    with counter:
        torch.ops._c10d_functional.reduce_scatter_tensor_out(
            torch.ones(12), "sum", WORLD, dist.group.WORLD.group_name, out=out
        )
    assert _totals(counter.counts["other"]) == {"reduce_scatter": {"count": 1, "bytes": 48, "bus_bytes": 36.0}}


def test_message_sizes_are_kept_per_step(fake_group):
    collector = MetricsCollector("cpu", 0, WORLD)
    with collector.comm:
        for _ in range(2):
            with collector.step(measured=True):
                dist.all_reduce(torch.ones(10))
                dist.all_reduce(torch.ones(10))
                dist.all_reduce(torch.ones(3))
    per_step = collector.rank_record()["comm"]["per_step"]["all_reduce"]
    assert per_step["messages"] == {"40x1.5": 2, "12x1.5": 1}  # 2 x 40 B and 1 x 12 B per step, x 2(n-1)/n


def test_point_to_point_of_real_gloo_ranks_is_counted(tmp_path):
    """isend/irecv, batch_isend_irecv and send/recv between 2 gloo processes under torchrun."""
    proc = torchrun(2, str(REPO / "tests" / "dist" / "comm_p2p.py"), str(tmp_path))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    counts = [json.loads((tmp_path / f"rank_{r}.json").read_text()) for r in (0, 1)]
    # isend 24 B + batched 24 B (+ rank 0's blocking 4 B bf16 send); irecv and batched alike
    assert _totals(counts[0]) == {
        "send": {"count": 3, "bytes": 24 + 24 + 4, "bus_bytes": 52.0},
        "recv": {"count": 2, "bytes": 48, "bus_bytes": 48.0},
    }
    assert _totals(counts[1]) == {
        "send": {"count": 2, "bytes": 48, "bus_bytes": 48.0},
        "recv": {"count": 3, "bytes": 52, "bus_bytes": 52.0},
    }
    assert counts[0]["send"]["messages"] == {"24x1": 2, "4x1": 1}


def test_each_process_group_is_recorded_with_its_ranks_and_kinds(fake_group):
    """dp2 x ulysses2 with FSDP over all 4 ranks (the split's own mesh): the all-to-all runs on
    the 2-rank ulysses group, the sequence gather on the 2-rank sp group, FSDP's all-gather on
    all 4 ranks: three groups, each its own NCCL communicator (plan/run.py prices them)."""
    from wan_exp.parallel.dims import ParallelDims

    dims = ParallelDims(
        dp=2, cfg=1, fsdp=1, ring=1, ulysses=2, fsdp_enabled=True, fsdp_over_all_ranks=True, world_size=WORLD
    )
    meshes = dims.build_mesh("cpu")
    x = torch.ones(8)
    counter = CommCounter()
    with counter:
        dist.all_to_all_single(torch.empty(8), x, group=meshes.ulysses)
        dist.all_gather_into_tensor(torch.empty(16), x, group=meshes.sp)
        dist.all_gather_into_tensor(torch.empty(32), x, group=meshes.fsdp.get_group())
    groups = counter.record(0)["groups"]
    assert sorted((g["ranks"], tuple(g["kinds"])) for g in groups.values()) == [
        (2, ("all_gather",)),
        (2, ("all_to_all",)),
        (4, ("all_gather",)),
    ]
    assert groups[meshes.ulysses.group_name] == {"ranks": 2, "kinds": ["all_to_all"]}
    assert groups[meshes.sp.group_name] == {"ranks": 2, "kinds": ["all_gather"]}
    # a mesh dim over all ranks is the default group itself: pure ulysses is one communicator
    meshes = ParallelDims(
        dp=1, cfg=1, fsdp=1, ring=1, ulysses=WORLD, fsdp_enabled=False, fsdp_over_all_ranks=False, world_size=WORLD
    ).build_mesh("cpu")
    counter = CommCounter()
    with counter:
        dist.all_to_all_single(torch.empty(8), x, group=meshes.ulysses)
        dist.all_gather_into_tensor(torch.empty(32), x, group=meshes.sp)
    assert list(counter.record(0)["groups"].values()) == [{"ranks": WORLD, "kinds": ["all_gather", "all_to_all"]}]
