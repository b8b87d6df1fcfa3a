import pytest
import torch


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: one intra-op thread avoids spin-waiting on a busy 2-core CI machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
