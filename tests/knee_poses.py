"""Knee phantoms under new poses, shared by the global alignment's and the self-check's tests.

``tests/optim`` and ``tests`` are on ``sys.path`` (pytest's prepend import mode), so the test
modules import this one by name.
"""

import numpy as np
import torch
from neuralreg_eval import knee

from neuralreg import Image
from neuralreg.metrics import dice

CONFIG = dict(steps=150, points=4096, regularizer_points=1024, affine_steps=100)  # a 32x48x48 knee phantom


def moved(image: Image, world: np.ndarray) -> Image:
    """The same voxels under a new pose: world coordinates x -> world @ x."""
    return Image(image.data, world @ image.affine)


def tilt(angle_deg=20.0, axis=(1.0, 0.3, 0.2), offset=(40.0, -25.0, 15.0)) -> np.ndarray:
    m = np.eye(4)
    m[:3, :3] = knee._rotation(np.asarray(axis), np.deg2rad(angle_deg))
    m[:3, 3] = offset
    return m


def bone_dice(reg, moving_labels, fixed_labels):
    return dice(reg.warp(moving_labels, mode="nearest").data, fixed_labels.data, [1, 3])["mean"]


def in_air(image: Image, pad: int = 10) -> Image:
    """The image padded with ``pad`` voxels of air (0) on every side, the world unchanged."""
    shift = np.eye(4)
    shift[:3, 3] = -pad
    return Image(torch.nn.functional.pad(image.data.float(), (pad,) * 6), image.affine @ shift)
