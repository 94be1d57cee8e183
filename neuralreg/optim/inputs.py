"""The checks of a pair before it is registered: images, masks, grids, device memory.

Every check raises ``InputError`` with one line that names the input; none modifies its
arguments. ``PairRegistration`` runs them all before it allocates anything.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from neuralreg.config import RegistrationConfig, RunConfig, similarity_points
from neuralreg.errors import InputError
from neuralreg.geometry.image import Image

MAX_ANISOTROPY = 100.0  # the largest ratio of an image's voxel spacings (the thickest slices to the finest pixels)
MAX_FOV_RATIO = 12.0  # the global search needs every axis of the field of view this thick, relative to the longest
BYTES_PER_POINT = 2600  # peak memory per similarity point of a field (measured: 2.5 KB, 3D, lncc and ncc alike)
IMAGE_COPIES = 16  # bytes per voxel of the two images with their pyramids, edge weights and masks (float32)


def as_config(config) -> RegistrationConfig:
    """A ``RegistrationConfig`` from itself, a dict of its keys or None; else ``TypeError``."""
    return _as_dataclass(RegistrationConfig, config, "config")


def as_run_config(run) -> RunConfig:
    """A ``RunConfig`` from itself, a dict of its keys or None; else ``TypeError``."""
    return _as_dataclass(RunConfig, run, "run")


def _as_dataclass(cls, value, name: str):
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, dict):
        return cls.from_dict(value)
    raise TypeError(f"{name} must be a {cls.__name__}, a dict of its keys or None, not {type(value).__name__}")


def as_image(value, name: str) -> Image:
    """``value`` if it is an ``Image``; arrays and anything else raise ``TypeError`` (paths are
    read by the front door ``neuralreg.register_pair``, which sits above ``io``)."""
    if isinstance(value, Image):
        return value
    if isinstance(value, np.ndarray | torch.Tensor):
        raise TypeError(
            f"{name} must be a neuralreg.Image (data and voxel-to-world affine) or a file path, not an array; "
            "wrap it with neuralreg.Image.from_array(array, spacing=...)"
        )
    raise TypeError(f"{name} must be a neuralreg.Image or a file path, not {type(value).__name__}")


def check_image(image: Image, name: str) -> None:
    """Raise ``InputError`` for non-finite or constant images."""
    data = image.data
    if not data.is_floating_point():
        data = data.float()
    if not bool(torch.isfinite(data).all()):
        raise InputError(f"{name} contains NaN or Inf voxels")
    if float(data.max() - data.min()) == 0.0:
        raise InputError(f"{name} is constant: nothing to register")


def check_geometry(image: Image, name: str, cfg: RegistrationConfig) -> None:
    """Raise ``InputError`` for a grid the registration cannot work on: too few voxels for
    its coarsest level, voxels of absurd aspect, or (with the global search) a field of view
    far thinner along one axis than along the others."""
    coarsest = max((*cfg.pyramid, *(cfg.affine_pyramid if cfg.affine_steps else ())))
    need = max(4, 2 * coarsest)
    if min(image.shape) < need:
        raise InputError(
            f"{name} has shape {image.shape}: registering needs at least {need} voxels per axis "
            f"(its coarsest level shrinks the image {coarsest}-fold)"
        )
    spacing = image.spacing
    if spacing.max() > MAX_ANISOTROPY * spacing.min():
        shown = " x ".join(f"{v:.3g}" for v in spacing)
        raise InputError(f"{name} has voxels of {shown} mm: more than {MAX_ANISOTROPY:g} times longer than wide")
    extent = spacing * np.asarray(image.shape)
    if cfg.affine_steps and cfg.affine_init == "search" and extent.max() > MAX_FOV_RATIO * extent.min():
        shown = " x ".join(f"{v:.3g}" for v in extent)
        raise InputError(
            f"{name} spans {shown} mm: too thin along one axis for the global search "
            "(use affine_init 'centroid' or 'identity')"
        )


def checked_mask(mask: Image, image: Image, name: str) -> Image:
    """``mask`` as 0/1 (inside: its non-zero voxels, as ``io.read_mask`` reads a mask file);
    ``InputError`` when it is not on ``image``'s grid or is empty."""
    if mask.shape != image.shape:
        raise InputError(f"{name} has shape {mask.shape}, its image {image.shape}")
    if not mask.same_grid(image):
        offset = mask.grid_offset_mm(image)
        raise InputError(f"{name} is not on its image's grid: its voxels lie up to {offset:.3g} mm away")
    if not bool((mask.data != 0).any()):
        raise InputError(f"{name} is empty")
    return mask.with_data((mask.data != 0).to(torch.uint8))


def available_memory(device: torch.device) -> int | None:
    """Bytes of memory free for a run on ``device`` (Linux's MemAvailable on the CPU), or None where unknown."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def check_memory(cfg: RegistrationConfig, moving: Image, fixed: Image, device: torch.device) -> None:
    """Raise ``InputError`` before a run whose working set (points per step, the images) would
    not fit in the memory free on ``device``."""
    voxels = math.prod(moving.shape) + math.prod(fixed.shape)
    need = similarity_points(cfg, fixed.shape) * BYTES_PER_POINT + voxels * IMAGE_COPIES
    free = available_memory(device)
    if free is not None and need > free:
        raise InputError(
            f"this registration needs about {need / 2**30:.1f} GiB ({similarity_points(cfg, fixed.shape)} points "
            f"per step, {voxels} voxels), more than the {free / 2**30:.1f} GiB free: use fewer points"
        )


def check_device(device: torch.device, name: str) -> None:
    """Raise ``InputError`` for a CUDA device on a machine without a CUDA GPU."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InputError(f"device {name!r} requested but no CUDA GPU is available")
