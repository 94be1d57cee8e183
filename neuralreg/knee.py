"""OAI knee protocol: label maps on the half-resolution grid, left-right flips, synthetic MR pairs.

The OAI protocol of the GradICON paper registers DESS knees on their voxel grid at half
resolution, 80x192x192 (about 1.4 x 0.73 x 0.73 mm), with right knees flipped to left,
and scores the mean Dice of femoral (2) and tibial (4) cartilage. Here every image of a
pair is put on one canonical half-resolution grid (axis 0 is left-right, as in the OAI
sagittal scans); the scanners' positions are not used, as in the protocol.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from .image import Image
from .metrics import dice
from .phantoms import synthesize_mr

OAI_SHAPE = (80, 192, 192)
OAI_SPACING = (1.4, 0.729, 0.729)
FEMUR, FEMORAL_CARTILAGE, TIBIA, TIBIAL_CARTILAGE = 1, 2, 3, 4
CARTILAGE = (FEMORAL_CARTILAGE, TIBIAL_CARTILAGE)
BONES = (FEMUR, TIBIA)


def canonical_affine(shape=OAI_SHAPE, spacing=OAI_SPACING) -> np.ndarray:
    """Diagonal affine of the canonical grid, centered at the world origin."""
    d = len(shape)
    aff = np.diag([*map(float, spacing), 1.0])
    aff[:d, d] = -(np.asarray(shape) - 1) * np.asarray(spacing) / 2
    return aff


def resample_labels(labels: np.ndarray | torch.Tensor, shape=OAI_SHAPE) -> torch.Tensor:
    """A label map on a grid of ``shape`` covering the same extent: majority vote per output voxel.

    Each label's indicator is averaged (trilinear, area-like) onto the output grid and the
    label with the largest share wins, so thin structures (cartilage) survive halving.
    """
    lab = torch.as_tensor(np.asarray(labels)).long()
    values = torch.unique(lab).tolist()
    best = torch.full(tuple(shape), -1.0)
    out = torch.zeros(tuple(shape), dtype=torch.uint8)
    for v in values:
        share = F.interpolate((lab == v).float()[None, None], size=tuple(shape), mode="area")[0, 0]
        win = share > best
        out[win] = v
        best = torch.maximum(best, share)
    return out


def load_oai_labels(path, shape=OAI_SHAPE, spacing=OAI_SPACING) -> Image:
    """An OAI label map (NIfTI) on the canonical half-resolution grid (uint8 Image)."""
    import nibabel as nib

    data = np.asarray(nib.load(str(path)).dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {data.shape}")
    if tuple(data.shape) != tuple(shape):
        data = resample_labels(data, shape)
    return Image(torch.as_tensor(np.asarray(data)).to(torch.uint8), canonical_affine(shape, spacing))


def left_right_axis(image: Image) -> int:
    """The array axis closest to the world left-right (RAS x) direction."""
    d = image.n_dims
    return int(np.argmax(np.abs(image.affine[0, :d])))


def flip_left_right(image: Image) -> Image:
    """Mirror the anatomy left-right (along ``left_right_axis``) on the same grid: a right knee becomes a left one."""
    return image.with_data(torch.flip(image.data, dims=(left_right_axis(image),)))


def resample_to_shape(image: Image, shape=OAI_SHAPE, labels: bool = False) -> Image:
    """The image on a grid of ``shape`` covering the same extent (the OAI protocol's voxel-grid resampling).

    Intensities are area-averaged (down) or trilinear (up); label maps use ``resample_labels``.
    The affine is updated so world positions are kept.
    """
    d = image.n_dims
    old = np.asarray(image.shape, dtype=np.float64)
    new = np.asarray(shape, dtype=np.float64)
    if labels:
        data = resample_labels(image.data, shape)
    else:
        mode = "area" if np.all(new <= old) else ("trilinear" if d == 3 else "bilinear")
        kw = {} if mode == "area" else {"align_corners": False}
        data = F.interpolate(image.data.float()[None, None], size=tuple(shape), mode=mode, **kw)[0, 0]
    scale = np.eye(d + 1)
    scale[:d, :d] = np.diag(old / new)
    scale[:d, d] = (old / new - 1) / 2
    return Image(data, image.affine @ scale)


def bone_dice(labels_a: Image, labels_b: Image) -> float:
    """Mean Dice of femur and tibia between two label maps on one grid."""
    return dice(labels_a.data, labels_b.data, BONES)["mean"]


def choose_flip(moving_labels: Image, fixed_labels: Image) -> bool:
    """True if mirroring ``moving_labels`` left-right overlaps the fixed bones better."""
    return bone_dice(flip_left_right(moving_labels), fixed_labels) > bone_dice(moving_labels, fixed_labels)


def synthetic_pair(moving_labels: Image, fixed_labels: Image, seed: int = 0) -> dict:
    """MR-like images synthesized from two label maps (different noise/bias per image).

    Returns dict with ``moving``, ``fixed`` (float Images in [0, 1]) and the label maps.
    """
    return {
        "moving": synthesize_mr(moving_labels, seed=2 * seed + 11),
        "fixed": synthesize_mr(fixed_labels, seed=2 * seed + 12),
        "moving_labels": moving_labels,
        "fixed_labels": fixed_labels,
    }


def cartilage_dice(labels_a, labels_b) -> dict:
    """OAI score: ``{"femoral": .., "tibial": .., "mean": ..}`` Dice of labels 2 and 4."""
    per = dice(labels_a, labels_b, CARTILAGE)["per_label"]
    fem, tib = per.get(FEMORAL_CARTILAGE, 0.0), per.get(TIBIAL_CARTILAGE, 0.0)
    return {"femoral": fem, "tibial": tib, "mean": (fem + tib) / 2}


def score_maps(forward, inverse, moving_labels: Image, fixed_labels: Image, max_points: int = 200000) -> dict:
    """One scoring for every method, from its maps as ``io.DisplacementField`` s (world RAS mm).

    Args:
        forward: Phi_AB on the fixed grid (fixed -> moving points).
        inverse: Phi_BA on the moving grid, or None (no inverse-consistency error then).
        moving_labels, fixed_labels: label maps on the moving and fixed grids.

    Returns:
        cartilage Dice (femoral, tibial, mean), bone Dice, % negative Jacobian determinant
        of Phi_AB on the fixed grid, and mean inverse-consistency error (mm, moving grid).
    """
    from .coordinates import apply_affine, grid_points
    from .metrics import jacobian_determinant, percent_folds

    shape, affine = fixed_labels.shape, fixed_labels.affine
    x = apply_affine(affine, grid_points(shape, dtype=torch.float64))
    phi = forward.map_points(x).double()
    vox = apply_affine(np.linalg.inv(moving_labels.affine), phi).float()
    warped = moving_labels.sample(vox, mode="nearest").reshape(shape).round().long()
    cart = cartilage_dice(warped, fixed_labels.data)
    det = jacobian_determinant(phi.reshape(*shape, len(shape)), affine)
    out = {
        "femoral": cart["femoral"],
        "tibial": cart["tibial"],
        "cartilage": cart["mean"],
        "bone": dice(warped, fixed_labels.data, BONES)["mean"],
        "percent_folds": percent_folds(det),
        "ice_mm": float("nan"),
    }
    if inverse is not None:
        g = torch.Generator().manual_seed(0)
        mv = grid_points(moving_labels.shape, dtype=torch.float64)
        mv = mv[torch.randperm(mv.shape[0], generator=g)[:max_points]]
        y = apply_affine(moving_labels.affine, mv)
        back = forward.map_points(inverse.map_points(y).double()).double()
        out["ice_mm"] = float(torch.linalg.norm(back - y, dim=1).mean())
    return out


def registration_maps(reg):
    """A ``Registration`` as (forward, inverse) ``io.DisplacementField`` s on its grids."""
    from .io import DisplacementField

    return (
        DisplacementField(reg.displacement_on_grid(direction="forward"), reg.fixed_grid[1]),
        DisplacementField(reg.displacement_on_grid(direction="inverse"), reg.moving_grid[1]),
    )
