"""The CPU tensor counter (wan_exp/metrics/tensor_memory.py): bytes against hand-worked sizes,
frees, storage resizes (FSDP2's way of freeing its gathered parameters) and the collector's
per-stage peaks."""

from __future__ import annotations

import torch

from wan_exp.metrics.collector import MetricsCollector
from wan_exp.metrics.tensor_memory import TensorMemory

WORLD = 4  # ranks of the fake process group (conftest's fake_group)
F32 = 4


def test_counts_new_storages_not_views_and_uncounts_freed_ones():
    counter = TensorMemory()
    resize = torch.UntypedStorage.resize_
    with counter:
        a = torch.empty(1000)  # 4000 bytes
        b = torch.ones(250, 4)  # 4000 bytes
        view = a.view(10, 100)  # the same storage: nothing new
        b.add_(1.0)  # in place: nothing new
        assert counter.live_bytes == counter.peak_bytes == 2 * 1000 * F32
        del a
        assert counter.live_bytes == 2 * 1000 * F32  # the view keeps the storage alive
        del view
        assert counter.live_bytes == 1000 * F32
        product = b @ b.T  # 250 x 250 fp32
        assert counter.live_bytes == (1000 + 250 * 250) * F32
        del product
        assert counter.live_bytes == 1000 * F32
        assert counter.peak_bytes == (1000 + 250 * 250) * F32
        counter.reset_peak()
        assert counter.peak_bytes == 1000 * F32
        storage = b.untyped_storage()
        storage.resize_(0)  # freed without an op (FSDP's free_storage)
        assert counter.live_bytes == 0
        storage.resize_(2 * 1000 * F32)  # and allocated again
        assert counter.live_bytes == counter.peak_bytes == 2 * 1000 * F32
        meta = torch.empty(10**9, device="meta")  # no memory
        assert counter.live_bytes == 2 * 1000 * F32 and meta.numel() == 10**9
    # after exit: torch's own resize_ again, and nothing is counted
    assert torch.UntypedStorage.resize_ is resize
    before = counter.live_bytes
    untracked = torch.empty(100)
    b.untyped_storage().resize_(0)
    assert counter.live_bytes == before == 2 * 1000 * F32 and untracked.numel() == 100


def test_fsdp2_gathered_parameters_are_counted_while_they_live(fake_group):
    """fully_shard over 4 fake ranks, two layers each a unit: a rank holds a quarter of each
    weight; a unit's forward gathers its whole weight and frees it after (a storage resize, not
    an op: the counter must see it)."""
    from torch.distributed.fsdp import fully_shard

    with torch.device("meta"):
        model = torch.nn.Sequential(torch.nn.Linear(64, 64, bias=False), torch.nn.Linear(64, 64, bias=False))
    weight = 64 * 64 * F32
    counter = TensorMemory()
    with counter:
        for unit in (model[0], model[1], model):
            fully_shard(unit)
        before = counter.live_bytes  # the device mesh's rank table
        model.to_empty(device="cpu")
        assert counter.live_bytes - before == 2 * weight // WORLD
        x = torch.ones(8, 64)
        held = counter.live_bytes
        counter.reset_peak()
        with torch.no_grad():
            y = model(x)
        # after the forward only the output is new: both gathered weights were freed
        assert counter.live_bytes - held == y.numel() * F32 == 8 * 64 * F32
        # during it: a whole weight at least (the all-gather's output, then the unsharded weight)
        assert counter.peak_bytes - held >= weight


def test_collector_records_each_stage_peak_of_the_tensors_and_the_job_wide_one():
    collector = MetricsCollector("cpu", 0, 1, count_cpu_tensors=True)
    with collector.tensors:
        kept = torch.zeros(1024)  # 4 KiB held throughout
        with collector.stage("denoise"):
            transient = torch.zeros(256 * 1024)  # 1 MiB, freed inside the stage
            del transient
        with collector.stage("vae_decode"):
            held = torch.zeros(64 * 1024)  # 256 KiB
    record = collector.rank_record()
    stages = record["stages"]
    assert stages["denoise"]["peak_tensor_gib"] * 2**30 == 4096 + 2**20
    assert stages["vae_decode"]["peak_tensor_gib"] * 2**30 == 4096 + 2**18
    assert record["memory"]["peak_tensor_gib"] * 2**30 == 4096 + 2**20
    assert kept.numel() + held.numel() > 0
    # off (the default): absent, as every GPU figure on a CPU
    plain = MetricsCollector("cpu", 0, 1)
    assert plain.tensors is None and plain.rank_record()["memory"]["peak_tensor_gib"] is None


def test_on_the_meta_device_it_counts_what_would_be_allocated():
    """Meta tensors hold no memory, but a counter of the meta device adds up their bytes as it
    does a CPU tensor's, and drops them when the last tensor on a storage is gone."""
    counter = TensorMemory("meta")
    with counter:
        a = torch.empty(1000, device="meta")
        b = a.view(10, 100) * 2  # a view (no storage) and a product (one)
        assert counter.live_bytes == counter.peak_bytes == 2 * 1000 * F32
        del a, b
        assert counter.live_bytes == 0 and counter.peak_bytes == 2 * 1000 * F32
