"""A simulated rank's collectives deliver this rank's own data (wan_exp/plan/fake_collectives.py):
torch's fake process group leaves the output of a receive (and, in some versions, of an
all-to-all or a reduce-scatter) unwritten, so without the mode those buffers keep what they
were allocated with (here NaN)."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from wan_exp.metrics.comm import CommCounter
from wan_exp.parallel.ulysses import _all_to_all
from wan_exp.plan.fake_collectives import RealisticFakeCollectives, fill_from

WORLD = 4  # ranks of the fake process group (conftest's fake_group)


def nans(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype)


def test_the_fake_group_alone_leaves_a_receive_unwritten(fake_group):
    """(torch 2.11's fake group also left all-to-all and reduce-scatter outputs unwritten;
    later versions copy the input there, as the mode does.)"""
    received = nans(3)
    for request in dist.batch_isend_irecv(
        [dist.P2POp(dist.isend, torch.ones(3), 1), dist.P2POp(dist.irecv, received, WORLD - 1)]
    ):
        request.wait()
    assert received.isnan().all()


def test_outputs_get_this_ranks_input(fake_group):
    source = torch.randn(8, 5)
    with RealisticFakeCollectives():
        output = nans(8, 5)
        dist.all_to_all_single(output, source)
        scattered = nans(2, 5)
        dist.reduce_scatter_tensor(scattered, source)
        listed = [nans(3)]
        dist.reduce_scatter(listed[0], [torch.arange(3.0) + i for i in range(WORLD)])
        functional = funcol.all_to_all_single(source, None, None, dist.group.WORLD).wait()
    assert torch.equal(output, source)
    assert torch.equal(scattered, source[:2])
    assert torch.equal(listed[0], torch.arange(3.0))
    assert torch.equal(functional, source)


def test_ulysses_exchange_of_a_simulated_rank_carries_real_values(fake_group):
    heads_first = torch.randn(WORLD * 2, 6, dtype=torch.bfloat16)
    with RealisticFakeCollectives():
        exchanged = _all_to_all(heads_first, dist.group.WORLD)
    assert exchanged.shape == heads_first.shape and torch.equal(exchanged, heads_first)


def test_a_receive_gets_what_this_rank_last_sent_of_its_shape(fake_group):
    block, other = torch.randn(4, 3), torch.randn(2)
    with RealisticFakeCollectives():
        received, unmatched = nans(4, 3), nans(7)
        ops = [
            dist.P2POp(dist.isend, block, 1),
            dist.P2POp(dist.isend, other, 1),
            dist.P2POp(dist.irecv, received, 3),
            dist.P2POp(dist.irecv, unmatched, 3),
        ]
        for request in dist.batch_isend_irecv(ops):
            request.wait()
    assert torch.equal(received, block)
    assert unmatched.isnan().all()  # nothing of its shape was sent: left as it was


def test_a_sent_block_is_not_kept_alive_for_later_receives(fake_group):
    with RealisticFakeCollectives():
        sent = torch.randn(4, 3)
        for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, sent, 1)]):
            request.wait()
        del sent  # freed: a later receive of its shape gets nothing rather than keeping it
        received = nans(4, 3)
        for request in dist.batch_isend_irecv([dist.P2POp(dist.irecv, received, WORLD - 1)]):
            request.wait()
    assert received.isnan().all()


def test_counting_under_both_modes_counts_each_call_once(fake_group):
    counter = CommCounter()
    with counter, RealisticFakeCollectives():
        dist.all_to_all_single(nans(8), torch.ones(8))
        dist.reduce_scatter_tensor(nans(3), torch.ones(12))
    assert counter.counts["other"]["all_to_all"]["count"] == 1
    assert counter.counts["other"]["reduce_scatter"]["count"] == 1


@pytest.mark.parametrize("target_size, expected", [(6, [0, 1, 2, 0, 1, 2]), (2, [0, 1])])
def test_fill_repeats_or_cuts_the_source(target_size, expected):
    target = torch.zeros(target_size, dtype=torch.bfloat16)
    fill_from(target, torch.arange(3.0))
    assert target.tolist() == expected
    strided = torch.zeros(2, 4)[:, ::2]  # not contiguous
    fill_from(strided, torch.arange(4.0))
    assert strided.tolist() == [[0.0, 1.0], [2.0, 3.0]]


# op -> (its output argument, its input argument), by name in torch's schema, written out here
# independently of the module; each is handed NaN outputs directly, whatever this torch's fake
# group does with them itself
C10D_OUTPUT_INPUT = {
    "alltoall_base_": ("output", "input"),
    "_reduce_scatter_base_": ("output_tensor", "input_tensor"),
    "alltoall_": ("output_tensors", "input_tensors"),
    "reduce_scatter_": ("output_tensors", "input_tensors"),
    "reduce_scatter_tensor_coalesced_": ("outputs", "inputs"),
}


@pytest.mark.parametrize("name", sorted(C10D_OUTPUT_INPUT))
def test_each_c10d_output_is_filled_from_its_input_by_schema_position(name):
    schema = [a.name for a in getattr(torch.ops.c10d, name).default._schema.arguments]
    output_name, input_name = C10D_OUTPUT_INPUT[name]
    source = torch.randn(6)
    outputs, inputs = {
        "alltoall_base_": (nans(6), source),
        "_reduce_scatter_base_": (nans(3), source),
        "alltoall_": ([nans(6), nans(6)], [source, source * 2]),
        "reduce_scatter_": ([nans(3)], [[source, source * 2]]),
        "reduce_scatter_tensor_coalesced_": ([nans(3), nans(3)], [source, source * 2]),
    }[name]
    args = [None] * len(schema)
    args[schema.index(output_name)], args[schema.index(input_name)] = outputs, inputs
    RealisticFakeCollectives()._fill_c10d(name, tuple(args))
    filled = outputs if isinstance(outputs, list) else [outputs]
    expected = {
        "alltoall_": [source, source * 2],
        "reduce_scatter_": [source[:3]],
        "reduce_scatter_tensor_coalesced_": [source[:3], source[:3] * 2],
    }.get(name, [source[: filled[0].numel()]])
    assert all(torch.equal(f, e) for f, e in zip(filled, expected, strict=True))


def test_a_receive_from_any_source_and_a_functional_out_are_filled():
    mode = RealisticFakeCollectives()
    block = torch.randn(2, 2)
    for name in ("send", "recv_any_source_"):
        assert getattr(torch.ops.c10d, name).default._schema.arguments[0].name == "tensors"
    mode._fill_c10d("send", ([block], None, 1))
    received = nans(2, 2)
    mode._fill_c10d("recv_any_source_", ([received], None, 0))
    assert torch.equal(received, block)
    assert torch.ops._c10d_functional.reduce_scatter_tensor_out.default._schema.arguments[0].name == "input"
    out = nans(3)
    mode._fill_functional("reduce_scatter_tensor_out", (torch.arange(12.0), "sum", 4, "0"), {"out": out}, out)
    assert torch.equal(out, torch.arange(3.0))


def _assert_drawn_like(chunk: torch.Tensor, source: torch.Tensor) -> None:
    """``chunk`` is not ``source`` again, but has its mean and spread: within 6 standard errors
    (mean: std/sqrt(m); std: std/sqrt(2m), m samples) of the source's figures."""
    m = chunk.numel()
    mean, std = float(source.float().mean()), float(source.float().std())
    assert not torch.equal(chunk, source) and chunk.isfinite().all()
    assert abs(float(chunk.float().mean()) - mean) < 6 * std / m**0.5
    assert abs(float(chunk.float().std()) - std) < 6 * std / (2 * m) ** 0.5


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_all_gathered_chunks_of_other_ranks_have_the_shards_statistics_not_its_values(fake_group, dtype):
    """FSDP's gathered weights: this rank's rows stay its own, the other 3 ranks' chunks are
    drawn with the shard's mean and std (not the shard repeated); the job's RNG is untouched."""
    m = 4096
    source = (torch.randn(m) * 2 + 3).to(dtype)
    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    with RealisticFakeCollectives():
        gathered = nans(WORLD * m, dtype=dtype)
        dist.all_gather_into_tensor(gathered, source)
        listed = [nans(m, dtype=dtype) for _ in range(WORLD)]
        dist.all_gather(listed, source)
        functional = funcol.all_gather_tensor(source, 0, dist.group.WORLD).wait()
    assert torch.equal(torch.rand(3), expected_next)
    for chunks in (gathered.view(WORLD, m), listed, functional.view(WORLD, m)):
        assert torch.equal(chunks[0], source)  # rank 0's own chunk
        for other in chunks[1:]:
            _assert_drawn_like(other, source)
        assert not torch.equal(chunks[1], chunks[2])
