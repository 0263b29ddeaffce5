import os

# Triton kernels run under the interpreter on machines without a GPU; this must be set before
# triton is first imported. Where a GPU exists the kernels run compiled.
if not os.path.exists("/dev/nvidiactl"):
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Test shapes are tiny: one thread is as fast, and immune to OpenMP spinning against other load
# on a 2-core machine (the CLIs the tests start inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
