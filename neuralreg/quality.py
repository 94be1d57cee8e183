"""Self-diagnosis: is a fitted registration probably right?

A registration tool must never be silently wrong. After the fit, the same deterministic
set of fixed-grid points is scored three ways (the images' physical alignment, the
affine part alone and the full maps), where both images have data (points mapped outside
the moving grid, and windows reaching outside it, are left out: a cropped field of view
is no dissimilarity), and the maps are checked against each other:

| check | verdict when it fails |
|---|---|
| share of fixed points that the map sends inside the moving image >= 50 % | failed |
| round trip Phi_BA(Phi_AB(x)) within 1.5 x max(2 mm, 2 x the largest voxel side) of x (f) | failed |
| round trip within max(2 mm, 2 x the largest voxel side) of x (f) | check |
| local NCC of the full maps not below the affine part's (margin 0.02) (e) | check |
| normalized mutual information of the registered images >= 1.03 (a) | failed |
| global NCC of the registered images >= 0.85 (0.80 inside the body (c)), unless NMI >= 1.15 (g) | check |
| the fields move points <= 9 mm beyond the affine part, on average (d) | check |
| local NCC after the affine part alone >= 0.05, unless final global NCC >= 0.85 (b) or NMI >= 1.15 (g) | check |
| local NCC (NMI where >= 1.15 (g)) improved over the physical alignment, where the images overlap, below 0.95 | check |
| the images overlap in world space before registration (else: headers disagree) | check |
| % folds <= 1 | check |

(a) Studholme's (H(A) + H(B)) / H(A, B): 1 for independent images, whatever their
contrasts. Unrelated images (a brain and a knee, smooth noise and a knee phantom) score
1.007-1.009 after registration; knees of two subjects whose soft tissue does not
correspond, registered well, 1.07-1.12, and with the two images in different contrasts
1.07-1.10; an image against itself 1.44. Global NCC fails good registrations of such knees
(NCC 0.36-0.71) and of different contrasts, where it means nothing: it only asks for a look.
(b) unrelated images score 0.03; knees of two subjects 0.11, two brains 0.26. Knees whose
soft tissue does not correspond can score 0.049 after a right affine part and reach a
global NCC of 0.90 after the fields: a good final similarity overrules this check.
(c) with ``config.field_interior`` the fields fit inside the body and the points are
scored there too (``scored_inside_mask``): the outline, which no longer follows, does not
count against them. Inside the body, NCC is lower for good results (tissue intensities of
two subjects differ).
(d) ``field_correction_mm``: where the global alignment was off, the fields have to move
points far to repair it, and on knees they rarely do so whole. Knee pairs of two subjects
registered well: 4.7-9.0 mm; pairs whose bones ended up misplaced: mostly 9.6-18 mm;
unrelated images 19-61 mm. See docs/benchmarks.md (self-check) for the confusion table.
(e) one knee scanned twice in two contrasts, registered with cartilage Dice 0.96, scored
local NCC 0.06-0.07 below its affine part (and normalized MI 0.03-0.05 below): the fields
fit inside the body what these windows score everywhere; it asks for a look, not a failure.
(f) ``round_trip_fixed_mm``: the maps' round trip over this check's fixed-grid points;
``round_trip_limit_mm`` is the line of a look, 1.5 times it the line of a failure.
``report.json``'s ``inverse_consistency_error_mm`` (``metrics``) is the other composition,
Phi_AB(Phi_BA(y)) over the moving grid's voxels. Over 140 knee registrations of two subjects
(four generated families, defaults and ``mind_mi``) the round trip flagged no gross failure
that another check did not (gross failures at 0.4-0.9 times the limit, one at 3.0 times,
which shared almost no information); good ones with the defaults stay under 1.0 times it,
with ``mind_mi`` (whose two maps agree less) under 1.14 times on the families the failure
line was set on (``filled``, ``realistic``) and up to 1.62 times on the one kept to check it
(``contrast``). Beyond 1.5 times, the maps disagree by more than fitting noise.

(g) a scan against a deformed copy of itself in another contrast (tissues swapping order,
``examples/header_benchmark.py --contrast``), registered to within 0.3-0.6 mm, scores
normalized MI 1.15-1.31 and global NCC from -0.29 to 0.88: NCC asks for intensities related
linearly. Shifted off the true map (same scans, scored as here), normalized MI falls fast:
1.09-1.13 at 4 mm and at most 1.13 at 6-8 mm for the same scans in one contrast (IXI heads,
DESS knee), 1.04-1.11 at 4 mm across contrasts; knee pairs of two subjects, registered well
or not, stay at or below 1.13. At 1.15 and above the images are registered to within a few
mm whatever their contrasts, and the NCC lines give way to it (docs/benchmarks.md).

``verdict`` is ``"good"`` when every check passes, ``"check"`` when only the milder ones
fail (look at the result), ``"failed"`` when the result is probably wrong.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from neuralreg.geometry.coordinates import apply_affine, grid_world_box
from neuralreg.geometry.image import Image
from neuralreg.losses.similarity import lncc, ncc, normalized_mi
from neuralreg.optim.points import VoxelSampler

MIN_OVERLAP = 0.5
MIN_NMI = 1.03
SHARED_NMI = 1.15  # this much shared information: the NCC lines do not apply (g)
GOOD_NCC = 0.85
GOOD_NCC_INSIDE = 0.80  # the same line, scored inside the body (c)
MIN_LNCC_AFFINE = 0.05
AFFINE_MARGIN = 0.02
MAX_FOLDS_PERCENT = 1.0
ROUND_TRIP_FAILED = 1.5  # round trips beyond this multiple of their limit fail; between 1 and it, a look (f)
MAX_CORRECTION_MM = 9.0
MIN_SCORED_POINTS = 100  # fewer points inside both images: no similarity (NaN)
MIN_SCORED_WINDOWS = 10
ALIGNED_LNCC = 0.95  # physical alignment this good leaves nothing to improve (an image against itself: 1.0)


@dataclass
class Quality:
    """The verdict and what it rests on (``measures``: the numbers, ``reasons``: one line each)."""

    verdict: str
    reasons: list[str] = field(default_factory=list)
    measures: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        """One line for a terminal."""
        return f"{self.verdict}: " + "; ".join(self.reasons) if self.reasons else self.verdict


def _lncc_points(shape, n_windows: int, k: int, window: float, seed: int, mask=None) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    upper = torch.tensor([n - 1 for n in shape], dtype=torch.float64)
    if mask is None:
        centres = torch.rand(n_windows, len(shape), generator=g, dtype=torch.float64) * upper
    else:  # window centres inside the mask's voxels, jittered within them
        centres = VoxelSampler(shape, mask.cpu(), g).sample(n_windows).double()
    offsets = (torch.rand(n_windows, k, len(shape), generator=g, dtype=torch.float64) - 0.5) * window
    return (centres[:, None] + offsets).reshape(-1, len(shape)).clamp(min=0).minimum(upper)


def _similarities(moving: Image, mapped_world: torch.Tensor, fixed_vals: torch.Tensor) -> tuple:
    """(local NCC, share of points inside the moving grid, global NCC, normalized MI) of the
    moving image at world points (W * K, d) against ``fixed_vals`` (W windows, K points),
    where both images have data: points mapped outside the moving grid, and windows reaching
    outside it, are left out (a cropped field of view is no dissimilarity); NaN when too few remain."""
    n_windows = fixed_vals.shape[0]
    upper = torch.tensor([n - 1 for n in moving.shape], dtype=torch.float64)
    mv = apply_affine(np.linalg.inv(moving.affine), mapped_world.double())
    inside = ((mv >= 0) & (mv <= upper)).all(1)
    vals = moving.sample(mv.float()).reshape(n_windows, -1)
    both = inside.reshape(n_windows, -1)
    whole = both.all(1)
    enough = int(both.sum()) > MIN_SCORED_POINTS
    return (
        float(1.0 - lncc(vals[whole], fixed_vals[whole])) if int(whole.sum()) > MIN_SCORED_WINDOWS else math.nan,
        float(inside.double().mean()),
        float(1.0 - ncc(vals[both], fixed_vals[both])) if enough else math.nan,
        normalized_mi(vals[both], fixed_vals[both]) if enough else math.nan,
    )


@torch.no_grad()
def assess(
    reg,
    moving: Image,
    fixed: Image,
    percent_folds: float | None = None,
    n_windows: int = 4096,
    window: float = 7.0,
    points_per_window: int = 16,
    seed: int = 0,
    fixed_mask: torch.Tensor | None = None,
) -> Quality:
    """Score a ``Registration`` of ``moving`` onto ``fixed`` and give a verdict (see the module doc).

    ``fixed_mask`` (bool, the fixed grid's shape): score inside it only, where the fit drew
    its similarity points (the body's interior with ``config.field_interior``)."""
    vox = _lncc_points(fixed.shape, n_windows, points_per_window, window, seed, fixed_mask)
    x = apply_affine(fixed.affine, vox)
    fixed_vals = fixed.sample(vox.float()).reshape(n_windows, -1)

    affine_world = reg.affine_world()
    affine_points = apply_affine(affine_world, x)
    lncc_identity, overlap_identity, ncc_identity, nmi_identity = _similarities(moving, x, fixed_vals)
    lncc_affine, _, ncc_affine, nmi_affine = _similarities(moving, affine_points, fixed_vals)
    forward = reg.map_points(x.float(), "forward")
    correction = float(torch.linalg.norm(forward.double() - affine_points, dim=1).mean())
    lncc_final, overlap_final, ncc_final, nmi_final = _similarities(moving, forward, fixed_vals)
    # the round trip on the same fixed-grid points: Phi_BA(Phi_AB(x)) ~ x (``round_trip_fixed_mm``; not
    # report.json's inverse_consistency_error_mm, Phi_AB(Phi_BA(y)) over the moving grid)
    ice = float(torch.linalg.norm(reg.map_points(forward, "inverse").double() - x, dim=1).mean())
    spacing = float(max(fixed.spacing.max(), moving.spacing.max()))
    ice_limit = max(2.0, 2.0 * spacing)
    lo_f, hi_f = grid_world_box(fixed.shape, fixed.affine)
    lo_m, hi_m = grid_world_box(moving.shape, moving.affine)
    overlap_world = bool(np.all(lo_f <= hi_m) and np.all(lo_m <= hi_f))
    centres_mm = float(np.linalg.norm((lo_f + hi_f) / 2 - (lo_m + hi_m) / 2))
    measures = {
        "ncc_identity": ncc_identity,
        "ncc_affine": ncc_affine,
        "ncc_final": ncc_final,
        "lncc_identity": lncc_identity,
        "lncc_affine": lncc_affine,
        "lncc_final": lncc_final,
        "nmi_identity": nmi_identity,
        "nmi_affine": nmi_affine,
        "nmi_final": nmi_final,
        "overlap_identity": overlap_identity,
        "overlap_final": overlap_final,
        "round_trip_fixed_mm": ice,
        "field_correction_mm": correction,
        "round_trip_limit_mm": ice_limit,
        "world_boxes_overlap": overlap_world,
        "centre_distance_mm": centres_mm,
        "percent_folds": percent_folds,
        "scored_inside_mask": fixed_mask is not None,
    }
    return judge(measures)


def judge(measures: dict) -> Quality:
    """The verdict from ``assess``'s measures (None standing for NaN), e.g. a stored
    ``Registration.info["quality"]["measures"]`` with ``percent_folds`` filled in."""
    m = {k: (math.nan if v is None else v) for k, v in measures.items()}
    for old, new in (
        ("inverse_consistency_error_mm", "round_trip_fixed_mm"),
        ("inverse_consistency_limit_mm", "round_trip_limit_mm"),
    ):
        m.setdefault(new, m.get(old, math.nan))  # measures stored before the rename
    good_ncc = GOOD_NCC_INSIDE if m.get("scored_inside_mask") is True else GOOD_NCC
    failed, check = [], []
    if m["overlap_final"] < MIN_OVERLAP:
        failed.append(f"only {100 * m['overlap_final']:.0f} % of the fixed image maps inside the moving image")
    ice, ice_limit = m["round_trip_fixed_mm"], m["round_trip_limit_mm"]
    ice_failed = ROUND_TRIP_FAILED * ice_limit
    if not ice <= ice_failed:  # NaN included
        failed.append(
            f"a round trip Phi_BA(Phi_AB(x)) misses by {ice:.1f} mm (more than {ice_failed:.1f} mm): the two maps "
            "disagree"
        )
    elif ice > ice_limit:
        check.append(
            f"a round trip Phi_BA(Phi_AB(x)) misses by {ice:.1f} mm (more than {ice_limit:.1f} mm): the two maps "
            "agree only roughly"
        )
    lncc_identity, lncc_affine, lncc_final, ncc_final = (
        m[k] for k in ("lncc_identity", "lncc_affine", "lncc_final", "ncc_final")
    )
    if lncc_final < lncc_affine - AFFINE_MARGIN:
        check.append(
            f"the deformable fields lowered the similarity below the affine part's (local NCC {lncc_final:.3f} "
            f"< {lncc_affine:.3f})"
        )
    nmi_final = m.get("nmi_final", math.nan)
    if nmi_final < MIN_NMI:
        failed.append(
            f"the registered images share almost no information (normalized mutual information {nmi_final:.3f} "
            f"< {MIN_NMI}): unrelated images, or a global alignment that failed"
        )
    # images that share this much information are registered to within a few mm whatever their
    # contrasts; NCC, which asks for intensities related linearly, then means little (g)
    shared = nmi_final >= SHARED_NMI
    if ncc_final < good_ncc and not shared:
        check.append(f"the registered images correlate only moderately (NCC {ncc_final:.3f} < {good_ncc})")
    correction = m.get("field_correction_mm", math.nan)
    if correction > MAX_CORRECTION_MM:
        check.append(
            f"the fields move points {correction:.1f} mm beyond the global alignment on average (more than "
            f"{MAX_CORRECTION_MM:.0f} mm): the global alignment was probably off"
        )
    if lncc_affine < MIN_LNCC_AFFINE and not ncc_final >= good_ncc and not shared:
        check.append(f"after the global (affine) alignment the images hardly correlate (local NCC {lncc_affine:.3f})")
    nmi_identity = m.get("nmi_identity", math.nan)
    if m["overlap_identity"] >= MIN_OVERLAP and not lncc_identity >= ALIGNED_LNCC:
        if shared and not nmi_final > nmi_identity:
            check.append(
                f"no better than the images' physical alignment (normalized mutual information {nmi_final:.3f} vs "
                f"{nmi_identity:.3f})"
            )
        elif not shared and lncc_final <= lncc_identity:
            check.append(
                f"no better than the images' physical alignment (local NCC {lncc_final:.3f} vs {lncc_identity:.3f})"
            )
    if not m["world_boxes_overlap"]:
        check.append(
            f"the images do not overlap in world space (centres {m['centre_distance_mm']:.0f} mm apart): their "
            "headers disagree; aligned by the global search"
        )
    if m["percent_folds"] > MAX_FOLDS_PERCENT:
        check.append(f"{m['percent_folds']:.2f} % of the voxels fold (negative Jacobian determinant)")
    verdict = "failed" if failed else ("check" if check else "good")
    stored = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in m.items()}
    return Quality(verdict, failed + check, stored)


__all__ = ["Quality", "assess", "judge"]
