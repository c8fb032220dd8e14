"""Session-wide test settings.

TRITON_INTERPRET must be set before anything imports triton: these machines have no GPU, so the Triton
kernels run under the interpreter on CPU tensors. MACL_POISON_OUTPUTS makes every kernel launch fill its
outputs with NaN first, so an element a kernel forgets to write fails the comparison.
"""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("MACL_POISON_OUTPUTS", "1")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def torch_threads():
    """A setter of torch's intra-op thread count for the test (`torch_threads(T)`); the count is restored after."""
    before = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(before)


@pytest.fixture
def one_torch_thread(torch_threads):
    """One torch thread for tiny workloads (thread start-up dominates on a busy 2-core machine); restored after."""
    torch_threads(1)
