import os

import pytest
import torch

# Two gloo ranks share two cores: one intra-op thread each keeps them from fighting.
torch.set_num_threads(1)
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graph or guard leaks between tests."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
