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
from neuralreg.optim import search
from neuralreg.optim.points import interior_mask
from neuralreg.optim.stage import PairData, Stage

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


def choose_start(pair: PairData, draws: SharedDraws | None = None, progress: bool = False) -> tuple[AffineFit, dict]:
    """The global alignment: rigid starts from ``search.global_search`` (the scanners' own
    orientation always among them), each fitted as an affine (``AffineFit``); the one whose
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
        pair.moving, pair.fixed, max_angle_deg=cfg.search_max_angle, keep=cfg.search_starts
    )
    levels = len(cfg.affine_pyramid)
    ways = [0] + ([1] if pair.interior_masks is not None and levels > 1 else [])  # first level from the interior
    starts = [(k, way) for way in ways for k in range(len(candidates))]
    draws = SharedDraws() if draws is None else draws
    fits = [_start_fit(pair, candidates[k].matrix, way, draws) for k, way in starts]
    coarse, final, distinct = _fit_starts(fits, cfg, progress)
    rotations = [fit.rotation_deg() for fit in fits]
    best = search.prefer_small_rotation(distinct, final, rotations)
    others = [k for k in distinct if k != best]
    runner_up = min(others, key=lambda k: final[k]) if others else None
    chosen = candidates[starts[best][0]]
    facts = {
        "matrix_world_fixed_to_moving": chosen.matrix.tolist(),
        "angles_deg": list(chosen.angles_deg),
        "score": chosen.score,
        "identity_score": None if math.isnan(chosen.identity_score) else chosen.identity_score,
        "overlap": chosen.overlap,
        "candidate_scores": [candidates[k].score for k, _ in starts],
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


def _start_fit(pair: PairData, matrix: np.ndarray, interior_from: int, draws: SharedDraws) -> AffineFit:
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
    return AffineFit(sub, prealign=matrix, interior_from=interior_from, draws=draws)


def _fit_starts(fits: list, cfg, progress: bool) -> tuple[list, list, list]:
    """Every fit on the coarsest level; the distinct ones on the rest. Returns the coarse
    losses, the final losses (NaN for a fit dropped as the same map as one before it) and
    the indices of the distinct fits."""
    levels = len(cfg.affine_pyramid)
    bar = tqdm(total=cfg.affine_steps * len(fits), disable=not progress, desc="affine", dynamic_ncols=True)
    coarse = []
    for fit in fits:
        fit.run([0], bar=bar)
        coarse.append(fit.loss(0))
    distinct: list[int] = []
    for k in range(len(fits)):
        if all(fits[k].distance_mm(fits[j]) > SAME_MAP_MM for j in distinct):
            distinct.append(k)
    bar.total = cfg.affine_steps * len(distinct) + sum(f.steps_done for k, f in enumerate(fits) if k not in distinct)
    final = [math.nan] * len(fits)
    for k in distinct:
        fits[k].run(range(1, levels), bar=bar)
        final[k] = fits[k].loss(levels - 1)
    bar.close()
    return coarse, final, distinct


class SharedDraws:
    """The points, and the target's values at them, that the affine fits of one pair draw.

    Every start's fit draws from a generator of ``config.seed`` on the same voxels (a start
    moves only the moving image's world frame, not its voxels or masks), so fits on the same
    level, drawing from the same masks, from the same generator state, draw the same points
    and read the same target values. The first such fit records them with the generator's
    state at the level's end; the others replay them and take that state: the same bits as
    drawing them anew, without the sampling and the target's reads (a quarter of an affine
    step). Keys: (level, inside body, points, generator state) -> (draws per step, state
    after); ("judge", level, draws, points) -> the judging draws of ``AffineFit.loss``.

    Attributes:
        record: False keeps nothing: every fit draws its own points (the same result).
        replays: how many times a fit replayed draws recorded by another.
    """

    def __init__(self, record: bool = True):
        self.levels: dict = {}
        self.record = record
        self.replays = 0

    def get(self, key):
        """The draws recorded under ``key``, or None."""
        value = self.levels.get(key)
        self.replays += value is not None
        return value

    def put(self, key, value) -> None:
        """Record ``value`` under ``key`` (unless ``record`` is off)."""
        if self.record:
            self.levels[key] = value


class AffineFit:
    """The global affine T of one start, fitted alone (fields off), level by level.

    Symmetric similarity (``config.affine_similarity``), coarse to fine over
    ``config.affine_pyramid`` (``config.affine_steps`` split evenly); the run's optimizer (Adam) with a learning
    rate cosine-decayed over all levels. T starts at the identity or at the translation
    between intensity centroids (``config.affine_init``). Points are drawn as for the
    fields (``config.edge_fraction`` of them on edges, ``config.edge_power``), from a
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
        draws: SharedDraws | None = None,
    ):
        cfg, device = pair.cfg, pair.device
        self.draws = draws
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

    def run(self, levels, progress: bool = False, bar=None) -> None:
        """Fit the levels ``levels`` (indices into ``config.affine_pyramid``), in order."""
        cfg, pair = self.pair.cfg, self.pair
        total = cfg.affine_steps
        own = bar is None
        if own:
            bar = tqdm(
                total=sum(self.per_level[s] for s in levels), disable=not progress, desc="affine", dynamic_ncols=True
            )
        optimizer = self.optimizer
        for s in levels:
            points, interior = affine_fit_points(cfg, pair.points), s >= self.interior_from
            stage = pair.stage(cfg.affine_pyramid[s], self.generator, points, interior)
            key = (s, interior, points, bytes(self.generator.get_state().numpy()))
            shared = None if self.draws is None else self.draws.get(key)
            recorded: list = []
            pending: list[tuple[int, torch.Tensor]] = []  # (step, [loss, sim_ab, sim_ba]) not yet read
            for k in range(self.per_level[s]):
                frac = 0.5 * (1 + math.cos(math.pi * self.steps_done / max(total, 1)))
                optimizer.lr = cfg.affine_learning_rate * (0.05 + 0.95 * frac)
                optimizer.zero_grad()
                if shared is not None:
                    draw = shared[0][k]
                else:
                    draw = self._draw(stage, pair.fused_warp)
                    if self.draws is not None and self.draws.record:  # kept only where another fit may replay it
                        recorded.append(draw)
                sim_ab, sim_ba = self._terms(stage, pair.fused_warp, draw)
                loss = sim_ab + sim_ba
                loss.backward()
                optimizer.step()
                pending.append((self.steps_done, torch.stack([loss, sim_ab, sim_ba]).detach()))
                self.steps_done += 1
                bar.update(1)
                if len(pending) == pair.check_every or k == self.per_level[s] - 1:
                    self._read(pending, s, bar)  # one host synchronisation per check, as in the fields' loop
                    pending = []
            if shared is not None:  # on from where drawing them left the generator
                self.generator.set_state(shared[1])
            elif self.draws is not None:
                self.draws.put(key, (recorded, self.generator.get_state()))
        if own:
            bar.close()

    def _draw(self, stage: Stage, fused: bool) -> tuple:
        """One step's draws of ``_terms``: (fixed-domain draw, moving-domain draw)."""
        similarity = self.pair.cfg.affine_similarity
        return tuple(stage.draw(target, similarity, fused) for target in ("fixed", "moving"))

    def _terms(self, stage: Stage, fused: bool, draw: tuple | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """sim(A o T, B) at fixed points and sim(B o T^-1, A) at moving points (``config.affine_similarity``);
        ``draw``: the step's ``_draw``, or None to draw them."""
        affine, similarity = self.affine, self.pair.cfg.affine_similarity
        draw = draw if draw is not None else self._draw(stage, fused)
        sim_ab = stage.similarity(lambda u: affine.apply(u), "moving", "fixed", similarity, draw[0], fused)
        sim_ba = stage.similarity(
            lambda u: affine.apply(u, inverse=True), "fixed", "moving", similarity, draw[1], fused
        )
        return sim_ab, sim_ba

    def _read(self, pending, level: int, bar) -> None:
        for (j, _), (v_loss, v_ab, v_ba) in zip(pending, torch.stack([t for _, t in pending]).tolist(), strict=True):
            if not math.isfinite(v_loss):
                raise RegistrationDiverged(f"affine loss became non-finite at step {j}")
            self.history.append(
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
                bar.set_postfix(stage=level, sim=f"{v_ab:.4f}/{v_ba:.4f}")

    @torch.no_grad()
    def loss(self, level: int, draws: int = 4) -> float:
        """Symmetric similarity at affine level ``level``, on points of a fixed seed (the same for every start)."""
        pair = self.pair
        gen = torch.Generator(device=pair.device).manual_seed(pair.cfg.seed + 7919)
        stage = pair.stage(pair.cfg.affine_pyramid[level], gen, pair.points, inside_body=True)
        key = ("judge", level, draws, pair.points)
        shared = None if self.draws is None else self.draws.get(key)
        if shared is None:
            shared = [self._draw(stage, False) for _ in range(draws)]
            if self.draws is not None:
                self.draws.put(key, shared)
        total = 0.0
        for draw in shared:
            for term in self._terms(stage, False, draw):
                total += float(term)
        return total / draws

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
