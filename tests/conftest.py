"""Shared test fixtures. GPU tests carry @pytest.mark.gpu and skip where CUDA is absent."""

import os

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def own_cache_dir(tmp_path_factory):
    """The suite keeps what it caches (the launcher's parameter counts) in a folder of its
    own, shared by its launches, never the user's ~/.cache."""
    previous = os.environ.get("XDG_CACHE_HOME")
    os.environ["XDG_CACHE_HOME"] = str(tmp_path_factory.mktemp("cache"))
    yield
    if previous is None:
        del os.environ["XDG_CACHE_HOME"]
    else:
        os.environ["XDG_CACHE_HOME"] = previous


@pytest.fixture(scope="session", autouse=True)
def one_thread_per_launched_rank():
    """The jobs the suite launches run their ranks on one OpenMP thread each (OMP_NUM_THREADS=1,
    which the launcher leaves as the user set it): the ranks share the machine's cores with this
    process, and two threads of a lone rank spin-wait on each other over the tiny model's small
    operations (a one-rank job ran 1.6 times longer with them on a busy 2-core machine)."""
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"
    yield
    if previous is None:
        del os.environ["OMP_NUM_THREADS"]
    else:
        os.environ["OMP_NUM_THREADS"] = previous


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def fake_group(request):
    """torch's fake process group in this one process: rank 0 of the test module's ``WORLD`` ranks
    (collectives return without moving data, as for a simulated rank)."""
    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=request.module.WORLD)
    yield
    dist.destroy_process_group()


@pytest.fixture
def one_cpu_thread():
    """Run torch on one CPU thread: on a shared machine, OpenMP threads of small convolutions
    (the VAE at test size) wait on each other and run tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
