import os

# Test shapes are tiny: one thread is as fast, and immune to OpenMP spinning against other load
# on a 2-core machine (the CLIs the tests start inherit it).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402  (importing torch does not import triton)

from ddpm.runtime import use_inductor_cache  # noqa: E402

# Triton kernels run under the interpreter on machines without a GPU; this must be set before
# triton is first imported. Where a GPU exists the kernels run compiled.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
# Inductor's caches do not notice a change to the ops in kernels/ (ddpm.runtime.kernels_fingerprint):
# plain torch.compile calls too cache in a folder per version of them, as compile_model does.
use_inductor_cache()
# Eager and compiled paths are compared at fp32 tolerances: no TF32 in cuDNN convolutions or matmuls.
torch.backends.cudnn.allow_tf32 = False
torch.backends.cuda.matmul.allow_tf32 = False


@pytest.fixture(scope="session")
def device():
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def dispatched_ops():
    """dispatched_ops(fn) runs fn() and returns the names of the ops it dispatched (aten and custom
    ops, e.g. "ddpm_kernels.attention.default"): proof of which kernels a backend really runs."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Recorder(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.names = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.names.add(str(func))
            return func(*args, **(kwargs or {}))

    def run(fn):
        with Recorder() as recorder:
            fn()
        return recorder.names
    return run
