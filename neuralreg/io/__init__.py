"""Reading and writing images, label maps, masks and displacement fields.

- NIfTI (.nii, .nii.gz) through nibabel, any orientation (oblique included): world
  coordinates are nibabel's RAS+ mm, ``Image.affine`` is the file's best affine.
- 2D from NIfTI (a third axis of length 1 is dropped) and from PNG/JPEG (grey levels;
  axis 0 = rows, 1 mm pixels).
- Displacement fields are written in the ITK/ANTs convention: a 5D NIfTI
  (X, Y, Z, 1, 3), intent VECTOR, physical displacements in LPS (ITK's frame), on the
  grid of the image they are defined on; ``antsApplyTransforms`` and SimpleITK's
  ``DisplacementFieldTransform`` apply it unchanged.
- Every file is written to a temporary name in its folder and renamed: it appears
  whole or not at all.
- A ``.nii.gz`` whose data gzip would shrink by less than ``GZIP_MIN_SAVING`` (a
  displacement field or Jacobian in float32: ~7 %, for most of the output time) is stored
  in the gzip stream without compression (deflate level 0): still a valid ``.nii.gz``
  that every reader opens; label maps and images with background are compressed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from neuralreg.errors import InputError
from neuralreg.files import atomic_write, umask  # noqa: F401  (atomic_write: also neuralreg.io's)
from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import DisplacementField

NIFTI_SUFFIXES = (".nii", ".nii.gz")
RASTER_SUFFIXES = (".png", ".jpg", ".jpeg")
LPS = np.array([-1.0, -1.0, 1.0])
GZIP_MIN_SAVING = 0.2  # compress a .nii.gz only if a sample of it shrinks by this share
_GZIP_SAMPLES = 8  # evenly spaced pieces of ...
_GZIP_SAMPLE_BYTES = 1 << 17  # ... 128 KiB each are tried
DESCRIP = b"written by neuralreg"  # the NIfTI header's description: ``--overwrite`` replaces only such files


def _suffix(path: Path) -> str:
    name = path.name.lower()
    if name.endswith(".nii.gz"):
        return ".nii.gz"
    return path.suffix.lower()


def read_image(path, what: str = "image") -> Image:
    """Read a 2D or 3D image as float32 (``what`` names it in error messages)."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{what} not found: {path}")
    if not path.is_file():
        raise InputError(f"{what} is not a file: {path}")
    suffix = _suffix(path)
    if suffix in NIFTI_SUFFIXES:
        data, affine = _read_nifti(path, what)
    elif suffix in RASTER_SUFFIXES:
        data, affine = _read_raster(path, what)
    else:
        raise InputError(f"{what} {path}: unsupported format {suffix or '(none)'}; use .nii, .nii.gz, .png or .jpg")
    try:
        return Image(torch.from_numpy(np.array(data, copy=True, order="C")), affine)
    except ValueError as exc:  # the affine: NaN/Inf (a broken sform or qform) or singular
        raise InputError(f"{what} {path}: {exc} (see its header's sform and qform)") from None


def _slice_affine(affine: np.ndarray) -> np.ndarray:
    """The 3x3 affine of a 2D slice (voxel axes 0 and 1) from its 4x4 NIfTI affine.

    The slice's two in-plane columns are kept with the two world axes that span them best
    (the largest 2x2 determinant): the world's z for an axial slice, x for a sagittal one.
    """
    rows = max(((0, 1), (0, 2), (1, 2)), key=lambda r: abs(np.linalg.det(affine[np.ix_(r, (0, 1))])))
    keep = [*rows, 3]
    return affine[np.ix_(keep, [0, 1, 3])]


def _read_nifti(path: Path, what: str):
    import nibabel as nib

    try:
        img = nib.load(str(path))
        data = np.asanyarray(img.dataobj)
    except Exception as exc:
        raise InputError(f"{what} {path} is not a readable NIfTI file ({type(exc).__name__})") from None
    affine = np.asarray(img.affine, dtype=np.float64)
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    if data.ndim == 3 and data.shape[2] == 1:
        data = data[:, :, 0]
    if data.ndim == 2:
        affine = _slice_affine(affine)
    if data.ndim not in (2, 3):
        raise InputError(f"{what} {path} has {data.ndim} dimensions {data.shape}; only 2D and 3D images are supported")
    if min(data.shape) < 2:
        raise InputError(f"{what} {path} has shape {data.shape}: every axis needs at least 2 voxels")
    if np.iscomplexobj(data) or data.dtype.kind not in "biuf":
        raise InputError(f"{what} {path} has unsupported voxel type {data.dtype}")
    return data, affine


def _read_raster(path: Path, what: str):
    from PIL import Image as PILImage

    try:
        with PILImage.open(path) as im:
            data = np.asarray(im.convert("F"), dtype=np.float32)
    except Exception as exc:
        raise InputError(f"{what} {path} is not a readable image ({type(exc).__name__})") from None
    return data, np.eye(3)


def read_labels(path, what: str = "label map") -> Image:
    """Read an integer label map (refuses non-integer values)."""
    img = read_image(path, what)
    data = img.data
    if data.is_floating_point():
        if not bool(torch.isfinite(data).all()) or not bool((data == data.round()).all()):
            raise InputError(f"{what} {path} is not an integer label map (it has fractional or non-finite values)")
    if bool((data < 0).any()):
        raise InputError(f"{what} {path} has negative labels")
    return img.with_data(data.round().to(torch.int64))


def read_mask(path, what: str = "mask") -> Image:
    """Read a mask (non-zero = inside); refuses an empty mask."""
    img = read_image(path, what)
    if not bool(torch.isfinite(img.data.float()).all()):
        raise InputError(f"{what} {path} contains NaN or Inf")
    mask = (img.data != 0).to(torch.uint8)
    if not bool(mask.any()):
        raise InputError(f"{what} {path} is empty")
    return img.with_data(mask)


def preprocess(
    image: Image, modality: str = "mri", ct_window=(40.0, 400.0), percentile: float = 99.9, what: str = "image"
) -> Image:
    """Intensity normalization to [0, 1] (``what`` names the image in error messages).

    - ``mri``: clip to [min, ``percentile``-th percentile], then scale to [0, 1];
    - ``ct``: window (center, width) in HU, clipped to [0, 1];
    - ``none``: unchanged (float32).
    """
    data = image.data.float()
    if not bool(torch.isfinite(data).all()):
        raise InputError(f"{what} contains NaN or Inf voxels")
    if modality == "none":
        return image.with_data(data)
    if modality == "ct":
        center, width = (float(v) for v in ct_window)
        if not (np.isfinite(center) and np.isfinite(width) and width > 0):
            raise InputError(f"CT window must be a finite center and a width > 0, not {center:g} {width:g}")
        return image.with_data(((data - (center - width / 2)) / width).clamp(0, 1))
    if modality != "mri":
        raise InputError(f"unknown modality {modality!r}; use mri, ct or none")
    lo = float(data.min())
    flat = data.reshape(-1)
    if flat.numel() > 2_000_000:
        flat = flat[torch.randperm(flat.numel(), generator=torch.Generator().manual_seed(0))[:2_000_000]]
    hi = float(torch.quantile(flat, percentile / 100.0))
    if hi <= lo:
        hi = float(data.max())
    if hi <= lo:
        raise InputError(f"{what} is constant: nothing to register")
    return image.with_data(((data - lo) / (hi - lo)).clamp(0, 1))


def check_same_grid(image: Image, reference: Image, what: str, reference_what: str) -> None:
    """Raise ``InputError`` unless ``image`` lies on ``reference``'s grid (shape and affine)."""
    if image.shape != reference.shape:
        raise InputError(f"{what} has shape {image.shape}, {reference_what} {reference.shape}")
    if not image.same_grid(reference):
        raise InputError(
            f"{what} is not on the grid of {reference_what}: same shape, but its voxels lie up to "
            f"{image.grid_offset_mm(reference):.3g} mm away (another affine)"
        )


def read_pair(
    fixed,
    moving,
    fixed_labels=None,
    moving_labels=None,
    fixed_mask=None,
    moving_mask=None,
    modality: str = "mri",
    ct_window=(40.0, 400.0),
) -> dict:
    """Read a pair and its optional label maps and masks from files, checked and preprocessed.

    Returns a dict with ``fixed`` and ``moving`` (``preprocess``-ed, what is registered),
    ``moving_original`` (as read: what ``warped.nii.gz`` keeps), and ``fixed_labels``,
    ``moving_labels``, ``fixed_mask``, ``moving_mask`` (``Image`` or None). Label maps and
    masks must lie on their image's grid (shape and affine). Raises ``InputError``, one
    line naming the file.
    """
    out, paths = {}, {"fixed": fixed, "moving": moving}
    for key, path in paths.items():
        original = read_image(path, f"{key} image")
        if key == "moving":
            out["moving_original"] = original
        out[key] = preprocess(original, modality, ct_window, what=f"{key} image {path}")
    if out["fixed"].n_dims != out["moving"].n_dims:
        raise InputError(f"fixed image is {out['fixed'].n_dims}D but moving image is {out['moving'].n_dims}D")
    for key, path, reader in (
        ("fixed_labels", fixed_labels, read_labels),
        ("moving_labels", moving_labels, read_labels),
        ("fixed_mask", fixed_mask, read_mask),
        ("moving_mask", moving_mask, read_mask),
    ):
        out[key] = None
        if path is not None:
            side = key.split("_")[0]
            img = reader(path, key.replace("_", " "))
            check_same_grid(img, out[side], f"{key.replace('_', ' ')} {path}", f"the {side} image {paths[side]}")
            out[key] = img
    return out


def _affine4(affine: np.ndarray) -> np.ndarray:
    if affine.shape == (4, 4):
        return affine
    a = np.eye(4)
    a[:2, :2] = affine[:2, :2]
    a[:2, 3] = affine[:2, 2]
    return a


def check_output_path(path, what: str = "output") -> None:
    """Raise ``InputError`` unless ``path`` names a NIfTI file (.nii or .nii.gz)."""
    if _suffix(Path(path)) not in NIFTI_SUFFIXES:
        raise InputError(f"{what} {path}: unsupported format; write .nii or .nii.gz")


def write_image(image: Image, path, dtype=None) -> None:
    """Write an image or label map as NIfTI with its affine (2D as X x Y x 1)."""
    import nibabel as nib

    check_output_path(path)
    data = image.data.detach().cpu().numpy()
    if dtype is not None:
        data = data.astype(dtype)
    elif data.dtype == np.float64:
        data = data.astype(np.float32)
    elif data.dtype == np.int64:
        data = data.astype(np.int32)
    if data.ndim == 2:
        data = data[:, :, None]
    img = nib.Nifti1Image(data, _affine4(image.affine))
    img.set_qform(_affine4(image.affine), code=1)
    img.set_sform(_affine4(image.affine), code=1)
    img.header["descrip"] = DESCRIP
    _save_nifti(img, path)


def write_displacement_field(displacement_ras: torch.Tensor, affine: np.ndarray, path) -> None:
    """Write a displacement field (*shape, d) in RAS mm as an ITK/ANTs displacement field NIfTI."""
    import nibabel as nib

    disp = displacement_ras.detach().cpu().numpy().astype(np.float32)
    d = disp.shape[-1]
    if d == 3:
        disp = disp * LPS.astype(np.float32)
        data = disp[:, :, :, None, :]
    else:
        disp = disp * LPS[:2].astype(np.float32)
        data = disp[:, :, None, None, :]
    img = nib.Nifti1Image(data, _affine4(affine))
    img.header.set_intent("vector", (), "")
    img.set_qform(_affine4(affine), code=1)
    img.set_sform(_affine4(affine), code=1)
    img.header["descrip"] = DESCRIP
    _save_nifti(img, path)


def _save_nifti(img, path) -> None:
    """Write a nibabel image atomically; a ``.nii.gz`` compressed only where it pays (``GZIP_MIN_SAVING``)."""
    import gzip
    import zlib

    import nibabel as nib

    with atomic_write(path) as tmp:
        if _suffix(Path(path)) != ".nii.gz":
            nib.save(img, tmp)
            return
        data = img.to_bytes()
        step = max(1, len(data) // _GZIP_SAMPLES)
        sample = b"".join(data[i : i + _GZIP_SAMPLE_BYTES] for i in range(0, len(data), step))
        level = 1 if len(zlib.compress(sample, 1)) < (1 - GZIP_MIN_SAVING) * len(sample) else 0
        # no name and no time in the gzip header: a run under a seed writes the same bytes
        with open(tmp, "wb") as raw, gzip.GzipFile("", "wb", compresslevel=level, fileobj=raw, mtime=0) as f:
            f.write(data)


def read_displacement_field(path) -> DisplacementField:
    """Read an ITK/ANTs displacement field NIfTI (vectors in LPS) as RAS mm."""
    import nibabel as nib

    path = Path(path)
    if not path.is_file():
        raise InputError(f"displacement field not found: {path}")
    try:
        img = nib.load(str(path))
        data = np.asarray(img.dataobj, dtype=np.float32)
    except Exception as exc:
        raise InputError(f"{path} is not a readable NIfTI file ({type(exc).__name__})") from None
    if data.ndim != 5 or data.shape[3] != 1:
        raise InputError(f"{path} is not a displacement field (expected X x Y x Z x 1 x d, got {data.shape})")
    d = data.shape[4]
    grid_dims = 2 if data.shape[2] == 1 else 3
    if d != grid_dims:
        raise InputError(
            f"{path} has {d} displacement component(s) on a {grid_dims}D grid {data.shape[:3]}; expected {grid_dims}"
        )
    if not np.isfinite(data).all():
        raise InputError(f"{path} contains NaN or Inf displacements")
    affine = np.asarray(img.affine, dtype=np.float64)
    if d == 2:
        data = data[:, :, 0, 0, :] * LPS[:2].astype(np.float32)
        affine = np.delete(np.delete(affine, 2, 0), 2, 1)
    else:
        data = data[:, :, :, 0, :] * LPS.astype(np.float32)
    return DisplacementField(torch.from_numpy(np.ascontiguousarray(data)), affine)


def write_itk_affine(matrix_ras: np.ndarray, path) -> None:
    """Write a (d+1)x(d+1) world (RAS mm) affine as an ITK transform file (``.tfm``, LPS).

    The transform maps fixed-space points to moving-space points, as ITK/ANTs
    registration transforms do, so ``antsApplyTransforms`` or SimpleITK can use it.
    """
    m = np.asarray(matrix_ras, dtype=np.float64)
    d = m.shape[0] - 1
    flip = np.diag([*LPS[:d].tolist(), 1.0])
    lps = flip @ m @ flip
    params = [*lps[:d, :d].reshape(-1).tolist(), *lps[:d, d].tolist()]
    text = (
        "#Insight Transform File V1.0\n#Transform 0\n"
        f"Transform: AffineTransform_double_{d}_{d}\n"
        f"Parameters: {' '.join(repr(float(p)) for p in params)}\n"
        f"FixedParameters: {' '.join(['0'] * d)}\n"
    )
    with atomic_write(path) as tmp, open(tmp, "w") as f:
        f.write(text)
