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

from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import DisplacementField
from neuralreg.metrics import dice
from neuralreg.phantoms import synthesize_mr
from neuralreg_eval.scoring import forward_on_grid, warp_labels_and_regularity

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
    """One scoring for every method, from its maps as ``DisplacementField`` s (world RAS mm).

    Args:
        forward: Phi_AB on the fixed grid (fixed -> moving points).
        inverse: Phi_BA on the moving grid, or None (no inverse-consistency error then).
        moving_labels, fixed_labels: label maps on the moving and fixed grids.

    Returns:
        cartilage Dice (femoral, tibial, mean), bone Dice, % negative Jacobian determinant
        of Phi_AB on the fixed grid, and mean inverse-consistency error (mm, moving grid).
    """
    phi = forward_on_grid(forward, fixed_labels)
    warped, regularity = warp_labels_and_regularity(forward, inverse, moving_labels, fixed_labels, max_points, phi)
    cart = cartilage_dice(warped, fixed_labels.data)
    view = in_view(phi, moving_labels)
    return {
        "femoral": cart["femoral"],
        "tibial": cart["tibial"],
        "cartilage": cart["mean"],
        "bone": dice(warped, fixed_labels.data, BONES)["mean"],
        # the same where the moving image has data: anatomy outside its field of view cannot be placed
        "bone_in_view": dice(warped[view], fixed_labels.data[view], BONES)["mean"],
        "cartilage_in_view": cartilage_dice(warped[view], fixed_labels.data[view])["mean"],
        **regularity,
    }


def in_view(phi: torch.Tensor, moving_labels: Image) -> torch.Tensor:
    """Fixed voxels (bool, fixed shape) whose mapped world points ``phi`` (*fixed shape, 3)
    (``scoring.forward_on_grid``) lie inside the moving grid."""
    from neuralreg.geometry.coordinates import apply_affine

    vox = apply_affine(np.linalg.inv(moving_labels.affine), phi.reshape(-1, 3)).reshape(phi.shape)
    upper = torch.tensor(moving_labels.shape, dtype=vox.dtype) - 1
    return ((vox >= -0.5) & (vox <= upper + 0.5)).all(-1)


GROSS_FAILURE_BONE_DICE = 0.85
GROSS_FAILURE_CARTILAGE_DICE = 0.30


def gross_failure(bone: float, affine_bone: float = float("nan"), cartilage: float = float("nan")) -> bool:
    """A registration lost the knee: bone Dice below 0.85, or more than 0.02 below its affine
    stage's alone (the fields undid the global alignment), or cartilage Dice below 0.30."""
    return bool(
        bone < GROSS_FAILURE_BONE_DICE
        or (np.isfinite(affine_bone) and bone < affine_bone - 0.02)
        or (np.isfinite(cartilage) and cartilage < GROSS_FAILURE_CARTILAGE_DICE)
    )


def registration_maps(reg):
    """A ``Registration`` as (forward, inverse) ``DisplacementField`` s on its grids."""
    return (
        DisplacementField(reg.displacement_on_grid(direction="forward"), reg.fixed_grid[1]),
        DisplacementField(reg.displacement_on_grid(direction="inverse"), reg.moving_grid[1]),
    )


# ---------------------------------------------------------------------------------------
# Realistic scanner geometry: the hard benchmark
# ---------------------------------------------------------------------------------------


def load_scan_labels(path, shape=OAI_SHAPE) -> Image:
    """An OAI label map on its scan's own affine, resampled to ``shape`` in voxel space.

    Unlike ``load_oai_labels`` the scanner geometry is kept: the affine is the file's
    (oblique, with its table offset), scaled to the half-resolution grid.
    """
    import nibabel as nib

    nii = nib.load(str(path))
    data = np.asarray(nii.dataobj)
    if data.ndim != 3:
        raise ValueError(f"{path}: expected a 3D label map, got shape {data.shape}")
    img = Image(torch.as_tensor(data.astype(np.uint8)), np.asarray(nii.affine, dtype=np.float64))
    return resample_to_shape(img, shape, labels=True) if tuple(data.shape) != tuple(shape) else img


def _rotation(axis: np.ndarray, angle_rad: float) -> np.ndarray:
    axis = axis / np.linalg.norm(axis)
    k = np.array([[0, -axis[2], axis[1]], [axis[2], 0, -axis[0]], [-axis[1], axis[0], 0]])
    return np.eye(3) + np.sin(angle_rad) * k + (1 - np.cos(angle_rad)) * (k @ k)


def perturb_geometry(
    labels: Image,
    rng: np.random.Generator,
    max_rotation_deg: float = 20.0,
    max_offset_mm: float = 50.0,
    max_fov_change: float = 0.15,
    scale_range: tuple = (0.9, 1.1),
    fov_range: tuple | None = None,
) -> tuple[Image, torch.Tensor]:
    """What another scanner or session does to a scan: new pose, field of view and size.

    - a rotation by up to ``max_rotation_deg`` about a random axis through the grid centre,
      and a world offset of up to ``max_offset_mm`` per axis (the affine changes, not the voxels);
    - an isotropic world scale drawn from ``scale_range`` (a bigger or smaller knee);
    - each axis cropped or padded by up to ``max_fov_change`` of its length, split at random
      between its two ends (the knee is no longer centred alike); ``fov_range`` (low, high)
      replaces (-max_fov_change, max_fov_change), e.g. (-0.3, 0.0) crops only (cut bones).

    Returns:
        the label map on its new grid, and a boolean (shape) mask of the voxels inside the
        original field of view (padding lies outside it).
    """
    shape = np.asarray(labels.shape)
    lo = np.zeros(3, dtype=int)
    new_shape = shape.copy()
    low, high = fov_range if fov_range is not None else (-max_fov_change, max_fov_change)
    for a in range(3):
        change = round(rng.uniform(low, high) * shape[a])
        first = round(rng.uniform(0, 1) * change)
        lo[a] = -first  # new voxel i is old voxel i + lo (negative lo: padding at the start)
        new_shape[a] = shape[a] + change
    data = torch.zeros(tuple(new_shape), dtype=labels.data.dtype)
    inside = torch.zeros(tuple(new_shape), dtype=torch.bool)
    src = [slice(max(lo[a], 0), min(lo[a] + new_shape[a], shape[a])) for a in range(3)]
    dst = [slice(s.start - lo[a], s.stop - lo[a]) for a, s in enumerate(src)]
    data[tuple(dst)] = labels.data[tuple(src)]
    inside[tuple(dst)] = True
    shift = np.eye(4)
    shift[:3, 3] = lo
    affine = labels.affine @ shift
    center = affine[:3, :3] @ ((new_shape - 1) / 2) + affine[:3, 3]
    axis = rng.normal(size=3)
    rot = _rotation(axis, np.deg2rad(rng.uniform(0, max_rotation_deg)))
    scale = rng.uniform(*scale_range)
    world = np.eye(4)
    world[:3, :3] = scale * rot
    world[:3, 3] = center - scale * rot @ center + rng.uniform(-max_offset_mm, max_offset_mm, 3)
    return Image(data, world @ affine), inside


def _distance_mm(mask: torch.Tensor, spacing) -> torch.Tensor:
    """Euclidean distance (mm) of every voxel to the nearest voxel of ``mask`` (scipy)."""
    from scipy.ndimage import distance_transform_edt

    return torch.from_numpy(distance_transform_edt(~mask.numpy(), sampling=spacing).astype(np.float32))


def synthesize_knee_mr(labels: Image, inside: torch.Tensor | None = None, seed: int = 0) -> Image:
    """An MR-like knee whose soft tissue belongs to this subject alone.

    Bone marrow and cartilage get subject-specific intensities; around the bones lie a
    muscle layer, a fat layer with texture in layers that follow the distance to the bone,
    skin and air, with thicknesses of this subject's own, so the soft tissue of two
    subjects does not correspond. Then a smooth bias field, blur and noise; voxels
    outside the field of view (``inside`` False) are 0.
    """
    rng = np.random.default_rng(seed)
    g = torch.Generator().manual_seed(seed)
    lab = labels.data.long()
    spacing = labels.spacing
    bone = (lab == FEMUR) | (lab == TIBIA) | (lab == 5)
    dist = _distance_mm(bone, spacing)
    muscle, fat = rng.uniform(5.0, 14.0), rng.uniform(4.0, 12.0)
    skin = muscle + fat
    lam, phase = rng.uniform(3.0, 7.0), rng.uniform(0, 2 * np.pi)
    img = torch.full(lab.shape, 0.02)  # air
    smooth = F.interpolate(
        torch.randn(1, 1, *[max(2, n // 6) for n in lab.shape], generator=g),
        size=tuple(lab.shape),
        mode="trilinear",
        align_corners=True,
    )[0, 0]
    fat_val = rng.uniform(0.55, 0.75) + 0.08 * torch.sin(2 * np.pi * dist / lam + phase) + 0.05 * smooth
    muscle_val = rng.uniform(0.25, 0.38) + 0.04 * smooth
    img = torch.where(dist <= skin + 1.5, torch.full_like(img, rng.uniform(0.4, 0.55)), img)
    img = torch.where(dist <= skin, fat_val, img)
    img = torch.where(dist <= muscle, muscle_val, img)
    table = {
        FEMUR: rng.uniform(0.4, 0.52),
        TIBIA: rng.uniform(0.38, 0.5),
        5: rng.uniform(0.4, 0.52),
        FEMORAL_CARTILAGE: rng.uniform(0.78, 0.9),
        TIBIAL_CARTILAGE: rng.uniform(0.75, 0.88),
        6: rng.uniform(0.75, 0.88),
    }
    for k in torch.unique(lab).tolist():
        if k != 0:
            img[lab == k] = float(table.get(k, rng.uniform(0.3, 0.6)))
    from neuralreg.phantoms import _blur, smooth_random_displacement

    bias = smooth_random_displacement(lab.shape, labels.affine, 1.0, 3, seed + 101)[..., 0]
    img = _blur(img * (1.0 + 0.2 * bias), 0.6)
    img = img + 0.03 * torch.randn(img.shape, generator=g)
    img = img.clamp(0, 1)
    if inside is not None:
        img = img * inside
    return labels.with_data(img)


def realistic_pair(fixed_path, moving_path, seed: int = 0, shape=OAI_SHAPE, perturb: bool = True) -> dict:
    """A synthetic inter-subject pair that keeps real scanner geometry, and harder.

    Each label map keeps its scan's affine (``load_scan_labels``); the moving knee is
    mirrored in voxel space when that overlaps the fixed bones better (OAI: right knees to
    left); with ``perturb`` each image then gets its own pose, offset, size and field of
    view (``perturb_geometry``); intensities come from ``synthesize_knee_mr``.

    Returns:
        dict with ``moving``, ``fixed`` (float Images), ``moving_labels``, ``fixed_labels``
        and ``flipped``.
    """
    fixed_labels = load_scan_labels(fixed_path, shape)
    moving_labels = load_scan_labels(moving_path, shape)
    flipped = choose_flip(moving_labels, fixed_labels)
    if flipped:
        moving_labels = flip_left_right(moving_labels)
    rng = np.random.default_rng(1000 + seed)
    out = {"flipped": flipped}
    for k, (name, lab) in enumerate((("fixed", fixed_labels), ("moving", moving_labels))):
        inside = None
        if perturb:
            lab, inside = perturb_geometry(lab, rng)
        out[name] = synthesize_knee_mr(lab, inside, seed=3 * seed + k + 17)
        out[f"{name}_labels"] = lab
    return out


def physical_bone_dice(moving_labels: Image, fixed_labels: Image) -> float:
    """Bone Dice after the identity map in world coordinates (moving resampled onto the fixed grid)."""
    from neuralreg.result import Registration

    return bone_dice(Registration.identity_warp(moving_labels, fixed_labels), fixed_labels)
