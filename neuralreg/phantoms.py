"""Generated data: the 2D hollow triangles/circles set, a 3D knee-like phantom, smooth deformations.

Everything here is procedural and seeded, so a fresh install can run its demo and tests
with no download.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from neuralreg.geometry.coordinates import apply_affine, grid_points
from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import map_grid, sample_world

KNEE_LABELS = {1: "femur", 2: "femoral cartilage", 3: "tibia", 4: "tibial cartilage"}


def triangle_or_circle(rng: np.random.Generator, size: int = 128, hollow: bool = True):
    """One image of the ICON/GradICON triangles-and-circles set, and its filled-shape mask.

    Same construction as ``icon_registration.data.get_dataset_triangles``: center in
    [0.4, 0.7]^2, radius in [0.2, 0.4], random rotation, tanh edges of slope 40, on the
    unit square sampled with ``size`` pixels per side.

    Returns:
        (image (size, size) float32 in [-1, 1] (or [0, 1] when hollow), mask (size, size) uint8).
    """
    x, y = np.mgrid[0 : 1 : size * 1j, 0 : 1 : size * 1j]
    cx, cy = rng.random() * 0.3 + 0.4, rng.random() * 0.3 + 0.4
    r = rng.random() * 0.2 + 0.2
    theta = rng.random() * np.pi * 2
    is_triangle = rng.random() > 0.5
    if is_triangle:
        sdf = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r * np.cos(np.pi / 3) / np.cos(
            (np.arctan2(x - cx, y - cy) + theta) % (2 * np.pi / 3) - np.pi / 3
        )
    else:
        sdf = np.sqrt((x - cx) ** 2 + (y - cy) ** 2) - r
    img = np.tanh(-40 * sdf)
    if hollow:
        img = 1 - img**2
    return img.astype(np.float32), (sdf < 0).astype(np.uint8)


def triangles_pair(seed: int = 0, size: int = 128, hollow: bool = True) -> dict:
    """A moving/fixed pair of the triangles-and-circles set, pixel spacing 1 mm.

    Returns:
        dict with ``moving``, ``fixed`` (Image) and ``moving_labels``, ``fixed_labels``
        (Image of uint8 filled-shape masks).
    """
    rng = np.random.default_rng(seed)
    (ma, sa), (mb, sb) = (
        triangle_or_circle(rng, size, hollow),
        triangle_or_circle(rng, size, hollow),
    )
    return {
        "moving": Image.from_array(ma),
        "fixed": Image.from_array(mb),
        "moving_labels": Image.from_array(sa),
        "fixed_labels": Image.from_array(sb),
    }


def smooth_random_displacement(
    shape,
    affine: np.ndarray,
    amplitude_mm: float,
    control_points: int = 4,
    seed: int = 0,
) -> torch.Tensor:
    """A smooth random displacement (*shape, d) in world mm on a grid.

    Gaussian random values on a coarse ``control_points``^d lattice spanning the grid,
    interpolated cubically (bicubic in 2D; trilinear of a blurred lattice in 3D), scaled
    so that the largest displacement magnitude is ``amplitude_mm``.
    """
    d = len(shape)
    g = torch.Generator().manual_seed(seed)
    coarse = torch.randn(1, d, *([control_points] * d), generator=g, dtype=torch.float64)
    if d == 2:
        disp = F.interpolate(coarse, size=tuple(shape), mode="bicubic", align_corners=True)
    else:
        fine = F.interpolate(coarse, scale_factor=4, mode="trilinear", align_corners=True)
        k = torch.tensor([1.0, 4.0, 6.0, 4.0, 1.0], dtype=torch.float64) / 16
        for axis in range(3):
            view = [1, 1, 1]
            view[axis] = 5
            w = k.reshape(1, 1, *view).repeat(d, 1, 1, 1, 1)
            pad = [0, 0, 0, 0, 0, 0]
            pad[2 * (2 - axis)] = pad[2 * (2 - axis) + 1] = 2
            fine = F.conv3d(F.pad(fine, pad, mode="replicate"), w, groups=d)
        disp = F.interpolate(fine, size=tuple(shape), mode="trilinear", align_corners=True)
    disp = disp[0].movedim(0, -1)
    disp = disp * (amplitude_mm / disp.norm(dim=-1).max())
    return disp.float()


def warp_by_displacement(image: Image, displacement_mm: torch.Tensor, mode: str = "linear") -> Image:
    """``image(x + u(x))`` on the image's own grid, u (*shape, d) in world mm."""
    x = map_grid(None, image.shape, image.affine, dtype=torch.float64)
    values = sample_world(image, x + displacement_mm.double(), mode, padding="border")
    if not image.data.is_floating_point():
        values = values.round().to(image.data.dtype)
    return image.with_data(values)


def knee_labels(shape=(40, 64, 64), spacing=(1.5, 1.0, 1.0), seed: int = 0) -> Image:
    """A knee-like label map: femur (1), femoral cartilage (2), tibia (3), tibial cartilage (4).

    Axes: 0 left-right, 1 anterior-posterior, 2 inferior-superior (sagittal slices along
    axis 0, as the OAI DESS scans). Sizes vary a little with ``seed``.
    """
    rng = np.random.default_rng(seed)
    aff = np.diag([*list(spacing), 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) * np.asarray(spacing) / 2  # centered at 0
    x = apply_affine(aff, grid_points(shape, dtype=torch.float64)).reshape(*shape, 3)
    lr, ap, si = x[..., 0], x[..., 1], x[..., 2]
    radius = 15.0 + rng.uniform(-1.5, 1.5)
    center_si = radius + 3.0
    cond_lr = 9.0 + rng.uniform(-1, 1)
    femur_sdf = torch.full(shape, 1e9, dtype=torch.float64)
    for side in (-1, 1):  # two condyles: spheres elongated across LR
        dlr = (lr - side * cond_lr).abs().clamp(min=0) / 1.4
        femur_sdf = torch.minimum(femur_sdf, torch.sqrt(dlr**2 + ap**2 + (si - center_si) ** 2) - radius)
    shaft = torch.sqrt((lr / 1.3) ** 2 + (ap + 2) ** 2) - (radius * 0.8)
    shaft = torch.where(si > center_si, shaft, torch.full_like(shaft, 1e9))
    femur_sdf = torch.minimum(femur_sdf, shaft)
    plateau = -2.0 + 0.02 * ap**2 / 10
    tibia_sdf = torch.maximum(si - plateau, torch.sqrt((lr / 1.25) ** 2 + (ap / 1.0) ** 2) - 21.0)
    labels = torch.zeros(shape, dtype=torch.uint8)
    thickness = 2.2 + rng.uniform(-0.3, 0.3)
    labels[(femur_sdf > 0) & (femur_sdf <= thickness) & (si < center_si - 2) & (ap < radius * 0.9)] = 2
    labels[(tibia_sdf > 0) & (si - plateau <= thickness - 0.4) & (si > plateau) & (ap.abs() < 17) & (lr.abs() < 22)] = 4
    labels[femur_sdf <= 0] = 1
    labels[tibia_sdf <= 0] = 3
    return Image(labels, aff)


def synthesize_mr(labels: Image, seed: int = 0, noise: float = 0.03, intensities: dict | None = None) -> Image:
    """An MR-like image from a label map: tissue intensities, textured soft tissue, bias field, blur, noise."""
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    table = {0: 0.22, 1: 0.45, 2: 0.85, 3: 0.42, 4: 0.8, 5: 0.45, 6: 0.8}
    if intensities:
        table.update(intensities)
    lab = labels.data.long()
    img = torch.zeros(lab.shape, dtype=torch.float32)
    for k in torch.unique(lab).tolist():
        img[lab == k] = table.get(k, float(rng.uniform(0.3, 0.7)))
    d = labels.n_dims
    texture = F.interpolate(
        torch.randn(1, 1, *[max(2, n // 4) for n in lab.shape], generator=g),
        size=tuple(lab.shape),
        mode="trilinear" if d == 3 else "bilinear",
        align_corners=True,
    )[0, 0]
    img = img + 0.05 * texture * (lab == 0)
    bias = smooth_random_displacement(lab.shape, labels.affine, 1.0, 3, seed + 101)[..., 0]
    img = img * (1.0 + 0.15 * bias)
    img = _blur(img, 0.6)
    img = img + noise * torch.randn(img.shape, generator=g)
    return labels.with_data(img.clamp(0, 1))


def _blur(img: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(np.ceil(2.5 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    out = img[None, None]
    d = img.dim()
    for axis in range(d):
        shape = [1] * d
        shape[axis] = k.numel()
        pad = [0] * (2 * d)
        pad[2 * (d - 1 - axis)] = pad[2 * (d - 1 - axis) + 1] = radius
        conv = F.conv3d if d == 3 else F.conv2d
        out = conv(F.pad(out, pad, mode="replicate"), k.reshape(1, 1, *shape))
    return out[0, 0]


def knee_phantom_pair(
    seed: int = 0,
    shape=(40, 64, 64),
    spacing=(1.5, 1.0, 1.0),
    amplitude_mm: float = 4.0,
) -> dict:
    """A knee-like phantom pair with labels, related by a known smooth deformation.

    The moving image is the fixed one pulled back through ``T(y) = y + u(y)``:
    ``moving(y) = fixed(T(y))``, so the true inverse field Phi_BA (moving -> fixed) is T.

    Returns:
        dict with ``moving``, ``fixed``, ``moving_labels``, ``fixed_labels`` (Image) and
        ``displacement`` (u, (*shape, 3) mm on the moving grid).
    """
    fixed_labels = knee_labels(shape, spacing, seed)
    fixed = synthesize_mr(fixed_labels, seed)
    disp = smooth_random_displacement(shape, fixed.affine, amplitude_mm, 4, seed + 7)
    moving_labels = warp_by_displacement(fixed_labels, disp, mode="nearest")
    moving = warp_by_displacement(synthesize_mr(fixed_labels, seed + 1), disp)
    return {
        "moving": moving,
        "fixed": fixed,
        "moving_labels": moving_labels,
        "fixed_labels": fixed_labels,
        "displacement": disp,
    }
