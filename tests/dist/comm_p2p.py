"""2 gloo ranks: the comm counter on dist.send/recv, isend/irecv and batch_isend_irecv, with
the data checked to have arrived. Each rank writes its counter's counts to <out dir>/rank_<r>.json
(tests/test_comm.py reads them)."""
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from wan_exp.metrics.comm import CommCounter

dist.init_process_group("gloo")
rank, peer = dist.get_rank(), 1 - dist.get_rank()
counter = CommCounter()
with counter:
    # isend / irecv: 6 floats out, 6 floats in
    sent = torch.full((6,), float(rank))
    received = torch.empty(6)
    requests = [dist.isend(sent, peer), dist.irecv(received, peer)]
    for request in requests:
        request.wait()
    assert torch.equal(received, torch.full((6,), float(peer))), received
    # batch_isend_irecv: 3 int64 out, 3 int64 in (as ring attention's exchange)
    block = torch.arange(3) + 10 * rank
    arrived = torch.empty(3, dtype=torch.int64)
    for request in dist.batch_isend_irecv([dist.P2POp(dist.isend, block, peer), dist.P2POp(dist.irecv, arrived, peer)]):
        request.wait()
    assert torch.equal(arrived, torch.arange(3) + 10 * peer), arrived
    # blocking send / recv: rank 0 sends 2 bf16 values, rank 1 receives them
    if rank == 0:
        dist.send(torch.ones(2, dtype=torch.bfloat16), 1)
    else:
        landed = torch.empty(2, dtype=torch.bfloat16)
        dist.recv(landed, 0)
        assert torch.equal(landed, torch.ones(2, dtype=torch.bfloat16))
Path(sys.argv[1], f"rank_{rank}.json").write_text(json.dumps(counter.counts["other"]))
dist.destroy_process_group()
