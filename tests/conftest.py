import os
from pathlib import Path

import pytest
import torch

torch.set_num_threads(int(os.environ.get("NEURALREG_TEST_THREADS", "2")))


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
