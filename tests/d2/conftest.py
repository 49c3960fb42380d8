"""One intra-op thread for these tests' tiny models (restored after each): their ops are too small to split, and
on shared CPU cores the thread hand-offs took longer than the ops."""
import pytest
import torch


@pytest.fixture(autouse=True)
def one_torch_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
