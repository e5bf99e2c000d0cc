import os

import pytest
import torch

# Never reach the Hub from tests.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# One thread per pytest-xdist worker: workers x threads above the core count makes OpenMP spin and crawl.
torch.set_num_threads(1 if os.environ.get("PYTEST_XDIST_WORKER") else max(1, min(2, os.cpu_count() or 1)))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def one_thread():
    """One intra-op torch thread for the test (tiny tensors on shared cores run faster), restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
