import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("NEURALREG_TEST_THREADS", "2")))
# the suite's runs keep their thread count (RunConfig.share_cpus off): tests that compare two
# runs must not see a count that followed the machine's load (the result differs by rounding);
# tests/optim/test_threads.py runs the sharing itself
os.environ.setdefault("NEURALREG_SHARE_CPUS", "0")


@pytest.fixture(autouse=True)
def _seeded():
    """Every test draws from torch's and numpy's global generators seeded alike, whatever ran
    before it: a test's random inputs do not depend on the order or the set of tests
    (``NEURALREG_TEST_SEED``, default 0, draws other inputs: a test must pass for any)."""
    import numpy as np

    seed = int(os.environ.get("NEURALREG_TEST_SEED", "0"))
    torch.manual_seed(seed)
    np.random.seed(seed)


def data_dir() -> Path | None:
    root = os.environ.get("NEURALREG_DATA")
    if root and Path(root).is_dir():
        return Path(root)
    return None


@pytest.fixture
def shared_data():
    root = data_dir()
    if root is None:
        pytest.skip("real data absent: set NEURALREG_DATA to the shared data folder")
    return root


@pytest.fixture(scope="module")
def phantom():
    """A 32x48x48 knee phantom pair (femur, tibia, cartilage) with labels."""
    from neuralreg.phantoms import knee_phantom_pair

    return knee_phantom_pair(0, shape=(32, 48, 48))
