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
