"""Shared test settings. Torch gets one intra-op thread per test process: on a shared 2-core
machine the default oversubscribes and turns millisecond kernels into seconds."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
