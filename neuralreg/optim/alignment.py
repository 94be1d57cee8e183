"""The global alignment of a pair: rigid starts from the global search, each fitted as an
affine (``AffineFit``), one of them chosen (``choose_start``).

Coordinates: ``AffineFit.affine`` acts on normalized coordinates of its pair's box;
``AffineFit.world`` and ``prealign`` are (d+1, d+1) world matrices (mm), fixed -> moving points.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
from tqdm.auto import tqdm

from neuralreg.config import affine_fit_points
from neuralreg.errors import RegistrationDiverged
from neuralreg.fields.affine import AffineMap, intensity_centroid, world_matrix
from neuralreg.geometry.coordinates import NormalizedBox, grid_corners_world
from neuralreg.geometry.image import Image
from neuralreg.losses import BATCHED, WINDOWED
from neuralreg.losses.similarity import mi, overlap_mi
from neuralreg.optim import search
from neuralreg.optim.adam import Adam, step_together
from neuralreg.optim.points import interior_mask
from neuralreg.optim.stage import PairData, Stage, sample

SAME_MAP_MM = 2.0  # two fitted starts whose world maps differ by less (mean over the fixed box) are one
WHOLE = 0.95  # an interior this share of the grid (or of the mask given) is the whole


def interior_within(image: Image, mask: Image | None, depth_mm: float) -> Image | None:
    """The mask the affine fits (and, with ``field_interior``, the fields' similarity points)
    draw from: ``points.interior_mask`` within ``mask``; ``mask`` itself where there is no
    usable interior."""
    inside = interior_mask(image, depth_mm)
    if inside is None:
        return mask
    within = torch.ones_like(inside) if mask is None else mask.data.to(inside.device) > 0
    inside = inside & within
    if not bool(inside.any()) or int(inside.sum()) >= WHOLE * int(within.sum()):
        return mask  # nothing left, or (nearly) everything: no interior to speak of
    return image.with_data(inside.to(image.data.device).float())


def prealigned(image: Image | None, prealign: np.ndarray) -> Image | None:
    """The moving image (or mask) in the fixed world frame: its affine becomes S^-1 A (S: fixed -> moving)."""
    if image is None:
        return None
    return Image(image.data, np.linalg.inv(prealign) @ image.affine)


def choose_start(pair: PairData, progress: bool = False) -> tuple[AffineFit, dict]:
    """The global alignment: rigid starts from ``search.global_search`` (the scanners' own
    orientation always among them) and ``search.centre_starts`` (the images' centres
    brought together), each fitted as an affine (``AffineFit``); the one whose
    symmetric similarity (``config.affine_similarity``) at the finest affine level (inside
    the body, ``PairData.interior_masks``) is lowest wins, unless a start rotated far less
    comes close to it (``search.prefer_small_rotation``).

    Where the images have an interior apart from their outline, each start is fitted
    twice: drawing from the interior on every level, and drawing from everything on the
    coarsest level (the outline widens the capture) and from the interior after it; the
    judge sees both (docs/benchmarks.md). All fits run the coarsest affine level; those that
    end on the same map as one listed before them (within ``SAME_MAP_MM``; the search's
    order, the interior-only fits first) are dropped; the rest are fitted on every level
    and judged at the finest (same points for all): the coarsest level's similarity alone
    chose wrong starts on hard knee pairs.

    Returns:
        (the winner's fit: its ``pair`` has the moving image pre-aligned by its rigid map
        ``prealign`` S, fixed -> moving world; facts: what the choice rested on, the
        ``candidate_*`` lists one entry per fit, in the order above).
    """
    cfg = pair.cfg
    candidates = search.global_search(
        pair.moving,
        pair.fixed,
        max_angle_deg=cfg.search_max_angle,
        keep=cfg.search_starts,
        measures=tuple(cfg.search_similarity.split("_")),
    ) + search.centre_starts(pair.moving, pair.fixed)
    levels = len(cfg.affine_pyramid)
    ways = [0] + ([1] if pair.interior_masks is not None and levels > 1 else [])  # first level from the interior
    starts = [(k, way) for way in ways for k in range(len(candidates))]
    fits = [_start_fit(pair, candidates[k].matrix, way) for k, way in starts]
    coarse, final, distinct = _fit_starts(fits, cfg, progress)
    rotations = [fit.rotation_deg() for fit in fits]
    best = search.prefer_small_rotation(distinct, final, rotations)
    others = [k for k in distinct if k != best]
    runner_up = min(others, key=lambda k: final[k]) if others else None
    chosen = candidates[starts[best][0]]
    facts = {
        "matrix_world_fixed_to_moving": chosen.matrix.tolist(),
        "angles_deg": list(chosen.angles_deg),
        "score": None if math.isnan(chosen.score) else chosen.score,
        "identity_score": None if math.isnan(chosen.identity_score) else chosen.identity_score,
        "overlap": chosen.overlap,
        "candidate_scores": [None if math.isnan(candidates[k].score) else candidates[k].score for k, _ in starts],
        "candidate_measures": [candidates[k].measure for k, _ in starts],
        # 1: the fit drew from everything on the coarsest level, 0: from the interior throughout
        "candidate_outline_first": [way for _, way in starts],
        "candidate_coarse_losses": [float(v) for v in coarse],
        # None: the same map as a fit listed before it
        "candidate_losses": [None if math.isnan(v) else float(v) for v in final],
        "candidate_rotations_deg": [round(r, 2) for r in rotations],
        "distinct_starts": len(distinct),
        "chosen": best,
        # how clearly the winner beat the best start that ended on another map
        "runner_up_loss_gap": None if runner_up is None else float(final[runner_up] - final[best]),
        "runner_up_distance_mm": None if runner_up is None else float(fits[runner_up].distance_mm(fits[best])),
    }
    return fits[best], facts


def _start_fit(pair: PairData, matrix: np.ndarray, interior_from: int) -> AffineFit:
    """The affine fit of one rigid start ``matrix`` (fixed -> moving world): the moving image,
    its masks and the box in the start's frame."""
    moving = prealigned(pair.moving, matrix)
    interior = pair.interior_masks
    if interior is not None:
        interior = (prealigned(interior[0], matrix), interior[1])
    box = NormalizedBox.around([(moving.shape, moving.affine), (pair.fixed.shape, pair.fixed.affine)], pair.cfg.margin)
    sub = dataclasses.replace(
        pair, moving=moving, moving_mask=prealigned(pair.moving_mask, matrix), interior_masks=interior, box=box
    )
    return AffineFit(sub, prealign=matrix, interior_from=interior_from)


def _fit_starts(fits: list, cfg, progress: bool) -> tuple[list, list, list]:
    """Every fit on the coarsest level; the distinct ones on the rest (``fit_together``:
    the fits of a level step together). Returns the coarse losses, the final losses (NaN
    for a fit dropped as the same map as one before it) and the indices of the distinct fits."""
    levels = len(cfg.affine_pyramid)
    bar = tqdm(total=cfg.affine_steps * len(fits), disable=not progress, desc="affine", dynamic_ncols=True)
    fit_together(fits, [0], bar=bar)
    coarse = judge(fits, 0)
    distinct: list[int] = []
    for k in range(len(fits)):
        if all(fits[k].distance_mm(fits[j]) > SAME_MAP_MM for j in distinct):
            distinct.append(k)
    bar.total = cfg.affine_steps * len(distinct) + sum(f.steps_done for k, f in enumerate(fits) if k not in distinct)
    kept = [fits[k] for k in distinct]
    fit_together(kept, range(1, levels), bar=bar)
    final = [math.nan] * len(fits)
    for k, loss in zip(distinct, judge(kept, levels - 1), strict=True):
        final[k] = loss
    bar.close()
    return coarse, final, distinct


class AffineFit:
    """The global affine T of one start, fitted alone (fields off), level by level.

    Symmetric similarity (``config.affine_similarity``), coarse to fine over
    ``config.affine_pyramid`` (``config.affine_steps`` split evenly); the run's optimizer (Adam) with a learning
    rate cosine-decayed over all levels. T starts at the identity or at the translation
    between intensity centroids (``config.affine_init``). Points are drawn as for the
    fields but ``config.affine_edge_fraction`` of them on edges (``config.edge_power``), from a
    generator of ``config.seed``, so every start of one pair sees the same draws.

    Attributes:
        pair: the pair, its moving image pre-aligned by ``prealign``.
        affine: the ``AffineMap`` fitted (normalized coordinates of ``pair.box``).
        prealign: (d+1, d+1) rigid world map S of this start (fixed -> moving).
        interior_from: the first level that draws from ``pair.interior_masks`` (all levels do
            by default; the judging ``loss`` always does).
        history: one dict per step (``part="affine"``).
    """

    def __init__(
        self,
        pair: PairData,
        prealign: np.ndarray | None = None,
        interior_from: int = 0,
    ):
        cfg, device = pair.cfg, pair.device
        d = pair.fixed.n_dims
        self.pair = pair
        self.interior_from = interior_from
        self.prealign = np.eye(d + 1) if prealign is None else prealign
        self.affine = AffineMap(d).to(device)
        if cfg.affine_init == "centroid":
            shift = (intensity_centroid(pair.moving) - intensity_centroid(pair.fixed)) / pair.box.scale
            with torch.no_grad():
                self.affine.translation.copy_(torch.as_tensor(shift, dtype=torch.float32))
        self.optimizer = pair.optimizer(self.affine.parameters(), cfg.affine_learning_rate)
        self.generator = torch.Generator(device=device).manual_seed(cfg.seed)
        total, n = cfg.affine_steps, len(cfg.affine_pyramid)
        self.per_level = [total // n + (1 if k < total % n else 0) for k in range(n)]
        self.steps_done = 0
        self.history: list[dict] = []

    def draw_key(self, level: int) -> tuple:
        """What this fit's next draws on ``level`` depend on: (level, inside the body, points,
        generator state); fits with the same key draw the same points."""
        points = affine_fit_points(self.pair.cfg, self.pair.points)
        return (level, level >= self.interior_from, points, bytes(self.generator.get_state().numpy()))

    def run(self, levels, progress: bool = False, bar=None) -> None:
        """Fit the levels ``levels`` (indices into ``config.affine_pyramid``), in order."""
        fit_together([self], levels, progress, bar)

    def loss(self, level: int, draws: int = 4) -> float:
        """Symmetric similarity at affine level ``level``, on points of a fixed seed (the same for every start)."""
        return judge([self], level, draws)[0]

    def world(self) -> np.ndarray:
        """The fitted global map, pre-alignment included: (d+1, d+1) world mm, fixed -> moving."""
        return self.prealign @ world_matrix(self.affine.matrix().detach().double().cpu().numpy(), self.pair.box)

    def rotation_deg(self) -> float:
        """Angle (degrees) of the rotation nearest the fitted global map's linear part (polar decomposition)."""
        d = self.pair.fixed.n_dims
        u, _, vt = np.linalg.svd(self.world()[:d, :d])
        rotation = u @ vt
        cos = (np.trace(rotation) - 1) / 2 if d == 3 else rotation[0, 0]
        return float(np.degrees(np.arccos(np.clip(cos, -1.0, 1.0))))

    def distance_mm(self, other: AffineFit) -> float:
        """Mean distance (mm) between the two fits' images of the fixed grid's corners and centre."""
        fixed = self.pair.fixed
        d = fixed.n_dims
        corners = grid_corners_world(fixed.shape, fixed.affine)
        x = np.vstack([corners, corners.mean(0)])
        a, b = self.world(), other.world()
        return float(np.linalg.norm((x @ a[:d, :d].T + a[:d, d]) - (x @ b[:d, :d].T + b[:d, d]), axis=1).mean())


def fit_together(fits: list[AffineFit], levels, progress: bool = False, bar=None) -> None:
    """Fit the levels ``levels`` of several ``AffineFit`` s, in order, all of a level in
    lockstep: one batch of terms, one backward and one Adam step a step.

    Every start's fit draws from a generator of ``config.seed`` on the same voxels (a start
    moves only the moving image's world frame, not its voxels or masks), so fits on the same
    level, drawing from the same masks, from the same generator state (the same
    ``AffineFit.draw_key``), draw the same points and read the same target values: such a
    group draws once. Groups that draw apart (the interior-only fits and those that drew
    from everything on the coarsest level) each draw their own points, and still step in
    one batch.

    A lockstep step computes every fit's two terms in one batch (``_terms``: the fits' maps
    as one (B, d+1, d+1) stack, one warp of all their points, the similarity of the batch,
    one backward, one ``adam.step_together``): each fit takes the steps it would take
    alone, for the operations of about one. The fits must have taken the same number of
    steps (as the starts of ``choose_start`` have).
    """
    if not fits:
        return
    own = bar is None
    if own:
        per_level = fits[0].per_level
        bar = tqdm(
            total=len(fits) * sum(per_level[s] for s in levels), disable=not progress, desc="affine", dynamic_ncols=True
        )
    for s in levels:
        groups: dict = {}
        for fit in fits:
            groups.setdefault(fit.draw_key(s), []).append(fit)
        by_points: dict = {}  # one batch per point count: the draws' shapes must agree
        for key, group in groups.items():
            by_points.setdefault(key[2], []).append((key, group))
        for batch in by_points.values():
            _fit_level(batch, s, bar)
    if own:
        bar.close()


def _fit_level(groups: list[tuple[tuple, list[AffineFit]]], s: int, bar) -> None:
    """Level ``s`` of groups of fits, each group drawing its own points (its ``key``, the
    ``AffineFit.draw_key`` of its fits), all stepping together."""
    lead = groups[0][1][0]
    fits = [fit for _, group in groups for fit in group]
    cfg, pair = lead.pair.cfg, lead.pair
    stages = [
        (
            len(group),
            group[0].pair.stage(cfg.affine_pyramid[s], group[0].generator, key[2], key[1], cfg.affine_edge_fraction),
        )
        for key, group in groups
    ]
    geometry = _Geometry(fits, stages[0][1])
    pending: list[tuple[int, torch.Tensor]] = []  # (step, (B, 3) [loss, sim_ab, sim_ba]) not yet read
    optimizers = [fit.optimizer for fit in fits]
    together = all(isinstance(opt, Adam) for opt in optimizers)
    for k in range(lead.per_level[s]):
        pair.poll_cpus()
        frac = 0.5 * (1 + math.cos(math.pi * lead.steps_done / max(cfg.affine_steps, 1)))
        for opt in optimizers:
            opt.lr = cfg.affine_learning_rate * (0.05 + 0.95 * frac)
            opt.zero_grad()
        draws = [(n, _draw(stage, cfg.affine_similarity, pair.fused_warp)) for n, stage in stages]
        terms = _terms(fits, geometry, draws, pair.fused_warp)  # (B, 2)
        losses = terms.sum(1)
        losses.sum().backward()
        if together:
            step_together(optimizers)
        else:
            for opt in optimizers:
                opt.step()
        pending.append((lead.steps_done, torch.cat([losses[:, None], terms], 1).detach()))
        for fit in fits:
            fit.steps_done += 1
        bar.update(len(fits))
        if len(pending) == pair.check_every or k == lead.per_level[s] - 1:
            _read(fits, pending, s, bar)  # one host synchronisation per check, as in the fields' loop
            pending = []
    for _, group in groups:
        state = group[0].generator.get_state()
        for fit in group[1:]:  # on from where drawing them left the generator, each fit's own
            fit.generator.set_state(state)


class _Geometry:
    """The voxel <-> normalized maps of one level for each fit of a batch, (B, d+1, d+1):
    the fits share the voxels (a start moves only the moving image's world frame), each has
    its own box and frame. ``stage`` is the first fit's."""

    def __init__(self, fits: list[AffineFit], stage: Stage):
        lead = fits[0]
        moving_grid = lead.prealign @ stage.moving.affine  # the moving level's voxels in its own world frame
        rows: dict = {"fixed": [], "moving": []}
        for fit in fits:
            box = fit.pair.box
            rows["fixed"].append(box.voxel_to_normalized_matrix(stage.fixed.affine))
            rows["moving"].append(box.voxel_to_normalized_matrix(np.linalg.inv(fit.prealign) @ moving_grid))
        device = lead.pair.device
        self.vox_to_u = {k: torch.tensor(np.stack(v), dtype=torch.float32, device=device) for k, v in rows.items()}
        self.u_to_vox = {
            k: torch.tensor(np.linalg.inv(np.stack(v)), dtype=torch.float32, device=device) for k, v in rows.items()
        }
        self.stage = stage


def _draw(stage: Stage, similarity: str, fused: bool) -> tuple:
    """One step's draws of ``_terms``: (fixed-domain draw, moving-domain draw)."""
    return tuple(stage.draw(target, similarity, fused) for target in ("fixed", "moving"))


def _per_fit(draws: list, target: int, part: int, fov: Image | None = None) -> torch.Tensor:
    """Part ``part`` of the draws' ``target`` draw (0: voxels (N, d), 1: values (N,)), or
    ``fov`` sampled at the voxels, one row per fit: (B, N, ...), each group's draw repeated
    for its fits (a view where one group draws for all)."""
    rows = []
    for n, draw in draws:
        x = draw[target][part]
        if fov is not None:
            x = sample(fov, x, False)
        rows.append(x.expand(n, *x.shape))
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _terms(fits: list[AffineFit], geometry: _Geometry, draws: list, fused: bool) -> torch.Tensor:
    """(B, 2): sim(A o T, B) at the fixed points and sim(B o T^-1, A) at the moving points
    (``config.affine_similarity``) for each fit's T. ``draws``: (fits, ``_draw``) per group
    of fits that drew together, in the fits' order (the counts add up to B)."""
    stage, pair = geometry.stage, fits[0].pair
    forward = torch.stack([fit.affine.matrix() for fit in fits])  # (B, d+1, d+1), normalized
    maps = {  # target voxels -> source voxels
        "fixed": geometry.u_to_vox["moving"] @ forward @ geometry.vox_to_u["fixed"],
        "moving": geometry.u_to_vox["fixed"] @ torch.linalg.inv(forward) @ geometry.vox_to_u["moving"],
    }
    similarity = pair.cfg.affine_similarity
    loss = pair.similarities[similarity]
    batched = loss in BATCHED
    fov = stage.fields_of_view if loss is mi else None  # name -> Image of its field of view, or None
    terms = []
    for t, (target, source) in enumerate(zip(("fixed", "moving"), (stage.moving, stage.fixed), strict=True)):
        m = maps[target]
        vox, target_vals = _per_fit(draws, t, 0), _per_fit(draws, t, 1)  # (B, N, d), (B, N)
        d = vox.shape[-1]
        points = torch.baddbmm(m[:, None, :d, d], vox, m[:, :d, :d].transpose(1, 2))
        warped = sample(source, points.reshape(-1, d), fused).reshape(target_vals.shape)
        if fov is not None:  # the overlap's mutual information (``losses.similarity.overlap_mi``)
            source_name = "moving" if target == "fixed" else "fixed"
            inside = sample(fov[source_name], points.reshape(-1, d), fused).reshape(warped.shape)
            terms.append(overlap_mi(warped, target_vals, inside * _per_fit(draws, t, 0, fov[target])))
            continue
        if similarity in WINDOWED:
            shape = (len(fits), -1, pair.cfg.lncc_patch_points)
            warped, target_vals = warped.reshape(shape), target_vals.reshape(shape)
        if batched:
            terms.append(loss(warped, target_vals))
        else:
            terms.append(torch.stack([loss(w, v) for w, v in zip(warped, target_vals, strict=True)]))
    return torch.stack(terms, 1)


def _read(fits: list[AffineFit], pending: list, level: int, bar) -> None:
    """The pending steps' terms into each fit's history; a non-finite loss raises."""
    values = torch.stack([t for _, t in pending]).tolist()  # (steps, B, 3)
    for (j, _), per_fit in zip(pending, values, strict=True):
        for fit, (v_loss, v_ab, v_ba) in zip(fits, per_fit, strict=True):
            if not math.isfinite(v_loss):
                raise RegistrationDiverged(f"affine loss became non-finite at step {j}")
            fit.history.append(
                {
                    "step": j,
                    "stage": level,
                    "part": "affine",
                    "loss": v_loss,
                    "sim_ab": v_ab,
                    "sim_ba": v_ba,
                    "reg": 0.0,
                }
            )
        if j % 10 == 0:
            bar.set_postfix(stage=level, sim=f"{per_fit[0][1]:.4f}/{per_fit[0][2]:.4f}")


@torch.no_grad()
def judge(fits: list[AffineFit], level: int, draws: int = 4) -> list[float]:
    """Each fit's symmetric similarity at affine level ``level``, on ``draws`` draws of
    points of a fixed seed, inside the body: the same for every start, and for a fit judged
    alone or among others."""
    pair = fits[0].pair
    gen = torch.Generator(device=pair.device).manual_seed(pair.cfg.seed + 7919)
    stage = pair.stage(pair.cfg.affine_pyramid[level], gen, pair.points, True, pair.cfg.affine_edge_fraction)
    shared = [_draw(stage, pair.cfg.affine_similarity, False) for _ in range(draws)]
    geometry = _Geometry(fits, stage)
    total = sum(_terms(fits, geometry, [(len(fits), draw)], False).sum(1) for draw in shared)
    return (total / draws).tolist()
