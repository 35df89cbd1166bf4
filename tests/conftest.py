"""Shared test fixtures. GPU tests carry @pytest.mark.gpu and skip where CUDA is absent."""
import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def one_cpu_thread():
    """Run torch on one CPU thread: on a shared machine, OpenMP threads of small convolutions
    (the VAE at test size) wait on each other and run tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
