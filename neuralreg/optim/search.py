"""Global alignment search: a rigid start that does not depend on the scanners' headers.

Scans of different subjects or sessions keep their scanner geometry: oblique grids,
table offsets of centimetres (or, with broken headers, metres), different fields of view.
A gradient-based affine fit started at the identity or at the intensity centroids gets
lost there. This module searches exhaustively, at a coarse isotropic resolution:

- over rotations: a grid of Euler angles (one angle in 2D), then a finer grid around the
  best few;
- over translations, for each rotation at once, by FFT: masked normalized
  cross-correlation of the two images for every shift (Padfield, "Masked object
  registration in the Fourier domain", IEEE TIP 2012), or normalized mutual information
  from the joint histogram of every shift (each pair of intensity bins one FFT
  correlation, as in Orchard and Mann, "Registering a multisensor ensemble of images",
  IEEE TIP 2010), counting only voxels inside both fields of view and only shifts where
  they overlap enough. NCC needs intensities that correspond; mutual information holds
  across contrasts (fat suppressed in one image, bright in the other), and each finds
  starts the other misses: ``measures=("ncc", "mi")`` keeps the candidates of both.

The result is a rigid world map S (fixed -> moving points): x_moving = R (x_fixed - c) + c' .
``register_pair`` uses it as a pre-alignment (``Registration.prealign``): the fields
and the affine stage then fit what remains, in a box around images that overlap.

Coordinates: world mm (``Image.affine``), points (N, d) in array-axis order.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

from neuralreg.fields.affine import intensity_centroid, weighted_centroid
from neuralreg.geometry.coordinates import apply_affine, grid_points, grid_world_box
from neuralreg.geometry.image import Image
from neuralreg.losses.similarity import normalized_mi_of_joint
from neuralreg.optim.points import field_of_view


@dataclass
class SearchResult:
    """Best rigid map found.

    Attributes:
        matrix: (d+1, d+1) world matrix, fixed -> moving points.
        score: the search measure at the best rotation and shift: masked NCC (1 is
            perfect) or normalized mutual information - 1 (0: independent), times the
            overlap share's power (``global_search``).
        identity_score: masked NCC of the identity map (physical alignment) on the same
            grid, NaN where the images do not overlap in world space.
        overlap: share of the fixed field of view inside the moving one at the optimum.
        angles_deg: Euler angles (x, y, z order of application; one angle in 2D).
        measure: ``"ncc"`` or ``"mi"``, the measure that found it; ``"centroid"`` or
            ``"centre"`` for the starts of ``centre_starts``.
    """

    matrix: np.ndarray
    score: float
    identity_score: float
    overlap: float
    angles_deg: tuple
    measure: str = "ncc"


def rotation_matrix(angles_deg) -> np.ndarray:
    """(d, d) rotation: one angle in 2D, or Euler angles about array axes 0, 1, 2 in 3D."""
    a = np.deg2rad(np.asarray(angles_deg, dtype=np.float64))
    if a.size == 1:
        c, s = math.cos(a.item()), math.sin(a.item())
        return np.array([[c, -s], [s, c]])
    out = np.eye(3)
    for axis, angle in enumerate(a):
        c, s = math.cos(angle), math.sin(angle)
        i, j = [k for k in range(3) if k != axis]
        r = np.eye(3)
        r[i, i], r[i, j], r[j, i], r[j, j] = c, -s, s, c
        out = r @ out
    return out


def _smoothed(image: Image, spacing_mm: float) -> Image:
    """Box-average the image towards ``spacing_mm`` (integer factor of its finest spacing)."""
    factor = max(1, int(spacing_mm / float(image.spacing.min()) / 1.5))
    return image.downsample(factor) if factor > 1 and min(image.shape) >= 2 * factor else image


def _resample(image: Image, points_world: torch.Tensor, shape) -> tuple[torch.Tensor, torch.Tensor]:
    """Values and inside-the-field-of-view mask of ``image`` at world points, as arrays of ``shape``."""
    vox = apply_affine(np.linalg.inv(image.affine), points_world).float()
    upper = torch.tensor([n - 1 for n in image.shape], dtype=vox.dtype)
    inside = ((vox >= 0) & (vox <= upper)).all(1)
    values = image.sample(vox, padding="border") * inside
    return values.reshape(shape), inside.float().reshape(shape)


class _MaskedNCC:
    """Masked NCC of a fixed image against every cyclic shift of moving images (FFT)."""

    def __init__(self, fixed: torch.Tensor, fixed_mask: torch.Tensor):
        self.shape = fixed.shape
        d = fixed.dim()
        self.dims = tuple(range(d))
        f = fixed.float() * fixed_mask
        self.total = fixed_mask.sum()
        self.F = [torch.fft.rfftn(x, dim=self.dims) for x in (fixed_mask.float(), f, f * fixed)]

    def corr(self, a_hat, b) -> torch.Tensor:
        """sum_x a(x) b(x + shift) for all shifts (a given by its FFT)."""
        return torch.fft.irfftn(a_hat.conj() * torch.fft.rfftn(b, dim=self.dims), s=self.shape, dim=self.dims)

    def __call__(self, moving: torch.Tensor, moving_mask: torch.Tensor, min_overlap: float, overlap_power: float):
        mm = moving_mask.float()
        m = moving.float() * mm
        fm, ff, fff = self.F
        n = self.corr(fm, mm)
        sf, sff = self.corr(ff, mm), self.corr(fff, mm)
        sm, smm = self.corr(fm, m), self.corr(fm, m * moving)
        sfm = self.corr(ff, m)
        n_safe = n.clamp(min=1.0)
        cov = sfm - sf * sm / n_safe
        var = (sff - sf * sf / n_safe).clamp(min=0) * (smm - sm * sm / n_safe).clamp(min=0)
        ncc = cov / torch.sqrt(var + 1e-6)
        # favour shifts where the fields of view overlap as much as they can: a small
        # overlap (the limb's outline against air, say) can correlate well by chance
        share = n / max(min(float(self.total), float(mm.sum())), 1.0)
        score = ncc * share.clamp(min=0) ** overlap_power
        score = torch.where(n >= min_overlap, score, torch.full_like(ncc, -2.0))
        return score, n


MI_BINS = 8


def _soft_bins(values: torch.Tensor, mask: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """(bins, *shape) weights of intensities in [0, 1] spread linearly over their two
    nearest bins (a triangular Parzen window), zero outside ``mask``."""
    x = values.float().clamp(0, 1) * (bins - 1)
    low = x.floor().clamp(max=bins - 2)
    w = (x - low) * mask
    low = low.long()[None]
    out = torch.zeros((bins, *values.shape))
    out.scatter_(0, low, (mask - w)[None])
    out.scatter_add_(0, low + 1, w[None])
    return out


class _MaskedMI:
    """Normalized mutual information (H(F) + H(M)) / H(F, M) of a fixed image against every
    cyclic shift of moving images, over the voxels inside both fields of view: the joint
    histogram of all shifts at once, bin pair (i, j) the FFT correlation of the fixed
    image's bin-i weights with the moving image's bin-j weights."""

    def __init__(self, fixed: torch.Tensor, fixed_mask: torch.Tensor):
        self.shape = fixed.shape
        self.dims = tuple(range(1, fixed.dim() + 1))
        self.total = fixed_mask.sum()
        self.F = torch.fft.rfftn(_soft_bins(fixed, fixed_mask), dim=self.dims).conj()[:, None]

    def __call__(self, moving: torch.Tensor, moving_mask: torch.Tensor, min_overlap: float, overlap_power: float):
        mm = moving_mask.float()
        M = torch.fft.rfftn(_soft_bins(moving, mm), dim=self.dims)[None]
        joint = torch.fft.irfftn(self.F * M, s=self.shape, dim=tuple(d + 1 for d in self.dims)).clamp(min=0)
        n = joint.sum((0, 1))
        nmi = normalized_mi_of_joint(joint / n.clamp(min=1.0), (0, 1)) - 1.0
        share = n / max(min(float(self.total), float(mm.sum())), 1.0)
        score = nmi * share.clamp(min=0) ** overlap_power
        score = torch.where(n >= min_overlap, score, torch.full_like(nmi, -2.0))
        return score, n


_MEASURES = {"ncc": _MaskedNCC, "mi": _MaskedMI}


def _shift_vector(index: int, shape) -> np.ndarray:
    """The cyclic shift (in voxels, signed) of a flat index of an FFT-correlation array."""
    idx = np.array(np.unravel_index(index, shape), dtype=np.float64)
    n = np.asarray(shape, dtype=np.float64)
    return np.where(idx > n / 2, idx - n, idx)


def global_search(
    moving: Image,
    fixed: Image,
    max_angle_deg: float = 40.0,
    angle_step_deg: float = 20.0,
    resolution: int = 32,
    refine_resolution: int = 48,
    keep: int = 4,
    min_overlap: float = 0.3,
    overlap_power: float = 0.5,
    measures: tuple = ("ncc",),
) -> list[SearchResult]:
    """Search rotations and translations for the rigid maps that best align two images.

    Args:
        moving, fixed: the images (2D or 3D), intensities comparable (e.g. preprocessed).
        max_angle_deg, angle_step_deg: rotation grid per axis, -max..max.
        resolution: coarse grid side (voxels) of the first pass; each of the ``keep`` best
            rotations is then refined on a grid of ``refine_resolution``, one axis at a time
            by ``angle_step_deg / 2`` each way.
        min_overlap: shifts where less than this share of the fixed field of view overlaps
            the moving one are not considered.
        overlap_power: the score is the measure x (overlap / largest possible overlap) ** this.
        measures: ``"ncc"`` (masked NCC) and/or ``"mi"`` (normalized mutual information):
            each searches on its own, and the candidates of all are returned.

    Returns:
        per measure, in the order given: up to ``keep`` distinct ``SearchResult`` s, best
        score first (the world matrix fixed -> moving), and the best shift at the physical
        orientation (no rotation, refined like the others) wherever it did not rank among
        them; seeds refined to the same candidate count once, and a candidate another
        measure found before is not repeated.
    """
    unknown = [m for m in measures if m not in _MEASURES]
    if unknown or not measures:
        raise ValueError(f"unknown search measure(s) {unknown}; choose from {', '.join(_MEASURES)}")
    d = fixed.n_dims
    lo_f, hi_f = grid_world_box(fixed.shape, fixed.affine)
    lo_m, hi_m = grid_world_box(moving.shape, moving.affine)
    c_f, c_m = (lo_f + hi_f) / 2, (lo_m + hi_m) / 2
    extent = float(max((hi_f - lo_f).max(), (hi_m - lo_m).max()))
    steps = np.arange(-max_angle_deg, max_angle_deg + 1e-6, max(angle_step_deg, 1e-3)) if max_angle_deg > 0 else [0.0]
    grid = [tuple(a) for a in itertools.product(steps, repeat=1 if d == 2 else 3)]
    half = angle_step_deg / 2 if max_angle_deg > 0 else 0.0
    ident = identity_score(moving, fixed, refine_resolution)
    found: list[SearchResult] = []
    for measure in measures:
        coarse = _Pass(moving, fixed, c_f, c_m, extent, resolution, min_overlap, overlap_power, measure)(grid)
        seeds = sorted(coarse, key=lambda r: -r[0])[: 2 * keep]
        # the scanners' own orientation (no rotation) is always a candidate: two scans of one
        # body part are rarely far apart, and a score that ties must not rotate them away
        physical = [r for r in coarse if not any(r[1])]
        seeds = physical + [r for r in seeds if any(r[1])]
        refine = _Pass(moving, fixed, c_f, c_m, extent, refine_resolution, min_overlap, overlap_power, measure)
        out: list[SearchResult] = []
        for seed in seeds:
            if len(out) == keep + len(physical):
                break
            local = [seed[1]] + [  # one axis at a time: 2 d' + 1 rotations around the seed
                tuple(float(a + (o if k == axis else 0.0)) for k, a in enumerate(seed[1]))
                for axis in range(len(seed[1]))
                for o in (-half, half)
            ]
            score, angles, matrix, overlap = max(refine(local), key=lambda r: r[0])
            if any(np.allclose(matrix, r.matrix, atol=1e-6) for r in out + found):
                continue  # two seeds refined to the same candidate: keep one
            out.append(SearchResult(matrix, score, ident, overlap, angles, measure))
        found += sorted(out, key=lambda r: -r.score)
    return found


class _Pass:
    """One resolution of the search with one measure (``_MEASURES``): the fixed side
    (resampled, its FFTs) prepared once, then ``self(rotations)`` -> [(score, angles,
    world matrix, overlap)], the best shift of each."""

    def __init__(self, moving, fixed, c_f, c_m, extent, resolution, min_overlap, overlap_power, measure: str = "ncc"):
        d = fixed.n_dims
        self.d, self.c_f, self.c_m, self.overlap_power = d, c_f, c_m, overlap_power
        self.spacing = 2.0 * extent / resolution  # the grid spans twice the largest extent: no wrap-around
        self.shape = (resolution,) * d
        self.offsets = (grid_points(self.shape, dtype=torch.float64) - (resolution - 1) / 2) * self.spacing
        self.moving = _smoothed(moving, self.spacing)
        f, fm = _resample(_smoothed(fixed, self.spacing), self.offsets + torch.as_tensor(c_f), self.shape)
        self.score = _MEASURES[measure](_normalize(f, fm), fm)
        self.fixed_voxels = float(fm.sum())
        self.need = min_overlap * self.fixed_voxels

    def __call__(self, rotations) -> list:
        d, out = self.d, []
        for angles in rotations:
            rot = rotation_matrix(angles)
            pts = self.offsets @ torch.as_tensor(rot).T + torch.as_tensor(self.c_m)
            m, mm = _resample(self.moving, pts, self.shape)
            score, n = self.score(_normalize(m, mm), mm, self.need, self.overlap_power)
            k = int(torch.argmax(score))
            shift = _shift_vector(k, self.shape) * self.spacing  # x_m = R (x - c_f + shift) + c_m
            matrix = np.eye(d + 1)
            matrix[:d, :d] = rot
            matrix[:d, d] = self.c_m + rot @ (shift - self.c_f)
            overlap = float(n.reshape(-1)[k]) / self.fixed_voxels
            out.append((float(score.reshape(-1)[k]), tuple(float(a) for a in angles), matrix, overlap))
        return out


def _normalize(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Intensities scaled to [0, 1] over the field of view (robust to each image's own range)."""
    inside = values[mask > 0]
    if inside.numel() == 0:
        return values
    lo, hi = float(inside.min()), float(torch.quantile(inside.float()[:: max(1, inside.numel() // 100000)], 0.99))
    return ((values - lo) / max(hi - lo, 1e-6)).clamp(0, 1) * mask


def centre_starts(moving: Image, fixed: Image, resolution: int = 48) -> list[SearchResult]:
    """Rigid starts at the scanners' orientation (no rotation) that bring two centres
    together: the images' intensity centroids (``measure="centroid"``, the centre of mass
    ANTs and elastix start their affine stages from) and the centroids of their fields of
    view (``measure="centre"``: where each scan holds data, ``points.field_of_view``).

    The search scores shifts by how well intensities (NCC) or their statistics (MI)
    correspond over the whole overlap; where the tissue of two subjects differs in
    contrast, every rotation's best shift can land the knee where one image's fat meets
    the other's marrow. A start from the centres asks nothing of the intensities, and the
    affine fit and the judge (``alignment.choose_start``) decide whether it wins.

    Returns:
        two ``SearchResult`` s, world matrices fixed -> moving (x_moving = x_fixed + c_m - c_f);
        ``score`` the masked NCC at the map and ``overlap`` the share of the fixed field of
        view inside the moving one (``ncc_at``); ``identity_score`` that of the identity.
    """
    d = fixed.n_dims
    ident = identity_score(moving, fixed, resolution)
    out = []
    for measure, centre in (("centroid", intensity_centroid), ("centre", _view_centroid)):
        matrix = np.eye(d + 1)
        matrix[:d, d] = centre(moving) - centre(fixed)
        score, overlap = ncc_at(Image(moving.data, np.linalg.inv(matrix) @ moving.affine), fixed, resolution)
        out.append(SearchResult(matrix, score, ident, overlap, (0.0,) * (1 if d == 2 else 3), measure))
    return out


def _view_centroid(image: Image) -> np.ndarray:
    """World centroid (d,) of the image's field of view (``points.field_of_view``)."""
    return weighted_centroid(image, field_of_view)


def identity_score(moving: Image, fixed: Image, resolution: int = 48) -> float:
    """Masked NCC of the two images under the identity map (world coordinates), NaN without overlap."""
    return ncc_at(moving, fixed, resolution)[0]


def ncc_at(moving: Image, fixed: Image, resolution: int = 48) -> tuple[float, float]:
    """(masked NCC, overlap) of the two images under the identity map (world coordinates),
    on a grid of about ``resolution`` voxels along the fixed image's longest side, smoothed
    to it: NCC over the voxels inside both grids (NaN without overlap), overlap the share
    of the fixed grid's voxels inside the moving one."""
    d = fixed.n_dims
    lo_f, hi_f = grid_world_box(fixed.shape, fixed.affine)
    extent = float((hi_f - lo_f).max())
    spacing = extent / resolution
    shape = tuple(max(2, math.ceil((h - l) / spacing) + 1) for l, h in zip(lo_f, hi_f, strict=True))
    pts = grid_points(shape, dtype=torch.float64) * spacing + torch.as_tensor(lo_f)
    f, fm = _resample(_smoothed(fixed, spacing), pts, shape)
    m, mm = _resample(_smoothed(moving, spacing), pts, shape)
    both = (fm * mm) > 0
    overlap = float(both.sum()) / max(float((fm > 0).sum()), 1.0)
    if int(both.sum()) < 10 * 2**d:
        return math.nan, overlap
    a, b = f[both].double(), m[both].double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / torch.sqrt((a * a).sum() * (b * b).sum() + 1e-12)), overlap


ROTATION_MARGIN_DEG = 15.0
LOSS_MARGIN = 0.2


def prefer_small_rotation(candidates: list[int], losses: list[float], angles: list[float]) -> int:
    """The start to keep: the lowest loss, unless a start rotated at least ``ROTATION_MARGIN_DEG``
    less (from the scanners' orientation) comes within ``LOSS_MARGIN`` of it (a share of the
    loss's magnitude); then the lowest loss among those.

    Two scans of one body part are rarely tens of degrees apart, and where soft tissue does
    not correspond the similarity of starts rotated by 20-60 degrees can tie with the right
    one: a large rotation has to win by a clear margin.
    """
    best = min(candidates, key=lambda k: losses[k])
    within = losses[best] + LOSS_MARGIN * abs(losses[best])
    near = [k for k in candidates if angles[k] <= angles[best] - ROTATION_MARGIN_DEG and losses[k] <= within]
    return min(near, key=lambda k: losses[k]) if near else best


__all__ = [
    "SearchResult",
    "centre_starts",
    "global_search",
    "identity_score",
    "ncc_at",
    "prefer_small_rotation",
    "rotation_matrix",
]
