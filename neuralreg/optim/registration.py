"""``PairRegistration``: one run that registers a pair with two neural fields.

A run owns what a registration needs from start to end: the checked images and masks,
the config, the two fields Phi_AB and Phi_BA, the global part (rigid start and affine),
the optimizer, the point generator and the history. Its phases are methods, called in
this order by ``run``:

1. ``make_fields``: two new fields (the identity), initialized under ``config.seed``;
2. ``align``: the global part, from the global search's rigid starts fitted as affines
   (``alignment.choose_start``), or one affine fit from the identity or the centroids;
3. ``fit_fields``: the fields coarse to fine (``fit_stage``, ``field_step``), with NaN
   recovery and the watchdog's rollback;
4. ``result``: the ``Registration`` and its self-check (``quality.assess``).

``neuralreg.register_pair`` (``api``, which also reads image files) is ``PairRegistration(...).run()``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import os
import time
import warnings
from collections.abc import Callable, Mapping

import numpy as np
import torch
from tqdm.auto import tqdm

from neuralreg.config import (
    RegistrationConfig,
    RunConfig,
    regularizer_points,
    similarity_points,
    stage_edge_fraction,
    stage_point_shares,
    stage_similarity,
)
from neuralreg.errors import InputError, RegistrationDiverged, RegistrationWarning
from neuralreg.fields.affine import AffineMap, ComposedMap
from neuralreg.fields.field import NeuralField
from neuralreg.geometry.coordinates import NormalizedBox
from neuralreg.geometry.image import Image
from neuralreg.losses import CROSS_CONTRAST, DATA_SCALED, SIMILARITIES, WINDOWED
from neuralreg.losses.similarity import lncc as local_ncc
from neuralreg.losses.similarity import ncc as global_ncc
from neuralreg.losses.similarity import normalized_mi
from neuralreg.optim import inputs
from neuralreg.optim.adam import Adam
from neuralreg.optim.alignment import AffineFit, choose_start, interior_within
from neuralreg.optim.points import field_of_view
from neuralreg.optim.stage import FIELD_DRAWS_AT_ONCE, PairData, Stage, stage_steps
from neuralreg.optim.threads import CpuShare, run_threads
from neuralreg.optim.watchdog import Snapshot, Watchdog
from neuralreg.quality import assess
from neuralreg.result import Registration

SNAPSHOT_EVERY = 50  # steps between snapshots of the fields a rollback may return to
# global NCC after the global part below this: the contrasts are inverted (``_check_contrast``); knees of
# two subjects in one contrast, whose soft tissue does not correspond, scored -0.04 to 0.20, a head in
# another contrast whose tissues swap order -0.20
INVERTED_NCC = -0.1
# shared information (normalized MI on uniform points) that a windowed first field stage may lose
# against the global part before it is refit with mutual information (``_check_first_stage``): more
# than LOST_NMI and more than LOST_NMI_SHARE of what the global part shared (NMI - 1). On knees whose
# soft tissue does not correspond, stages that moved the bones 0.09-0.39 bone Dice off a good global
# part lost 11-53 % of it (0.012-0.035), the others at most 10 %; canonical and realistic knees at most
# 3.5 %; an image against itself, from a perfect start, 0.9 % (0.004; docs/benchmarks.md)
LOST_NMI = 0.005
LOST_NMI_SHARE = 0.1
# local NCC after a windowed first field stage (both directions, its own windows) from which the later
# stages keep fitting local NCC instead of ``fine_similarity`` (``_check_one_contrast``): one anatomy in
# one contrast, whose windows correlate almost perfectly once aligned. Scans against deformed copies of
# themselves under other headers (IXI heads, the DESS knee) reached 0.994-0.998 and were registered 20-25 %
# more precisely with local NCC after it; knees of two subjects stayed at or below 0.94 and IXI heads of two
# subjects below the line too (their registrations unchanged). A DESS knee against a deformed copy in
# another contrast reached 0.948 and lost precision with local NCC after it (0.49 -> 0.74 mm), so the line
# keeps clear of it (docs/benchmarks.md, "One anatomy in one contrast")
ONE_CONTRAST_LNCC = 0.97
# what a first field stage fits where the contrast checks find local NCC's model broken (inverted
# contrasts, shared information lost): mutual information, whatever the later stages fit. It matches
# tissue classes at the coarse level, where descriptors of two subjects' knees tell little; with
# ``mind_mi`` there as well, a contrast knee whose first stage had lost information ended 0.21 bone
# Dice lower (docs/benchmarks.md, "Whole families with mind_mi")
FIRST_STAGE_FALLBACK = "mi"


class PairRegistration:
    """Register ``moving`` (A) to ``fixed`` (B) with two neural fields: one run.

    Minimizes sim(A o Phi_AB, B) + sim(B o Phi_BA, A) + lambda * regularizer(Phi_AB, Phi_BA)
    with Adam, resampling points every step, coarse to fine: the images are box-averaged
    by ``config.pyramid[s]`` and the finest hash levels are switched on stage by stage.

    Args:
        moving, fixed: 2D or 3D ``Image`` s with affines (world mm); intensities as given
            (see ``neuralreg.io`` for MRI/CT preprocessing).
        config: what is optimized: ``RegistrationConfig``, a dict of its keys, or None (defaults).
        moving_mask, fixed_mask: optional masks on the images' grids; similarity points
            are drawn inside them.
        run: how the run executes (device, threads, progress bars): ``RunConfig``, a dict of
            its keys, or None (defaults).
        optimizer: ``(parameters, learning_rate) ->`` optimizer (``lr``, ``zero_grad``,
            ``step``, ``state_dict``, ``load_state_dict``) of the affine fits and the fields.
        similarities: similarity name -> ``(warped, target) -> loss``: the table the
            config's ``similarity`` and ``affine_similarity`` are looked up in.

    Raises:
        InputError: unusable input (at construction, before anything is allocated).

    Attributes (filled as the phases run): ``phi_ab``, ``phi_ba``, ``affine``,
    ``prealign`` ((d+1, d+1) rigid world map, fixed -> moving), ``pair`` (``PairData``
    in the frame of the chosen start), ``generator``, ``history`` (one dict per step),
    ``search`` (the start's facts, or None).
    """

    def __init__(
        self,
        moving: Image,
        fixed: Image,
        config: RegistrationConfig | dict | None = None,
        moving_mask: Image | None = None,
        fixed_mask: Image | None = None,
        *,
        run: RunConfig | dict | None = None,
        optimizer: Callable = Adam,
        similarities: Mapping[str, Callable] | None = None,
    ):
        self.config = cfg = inputs.as_config(config)
        self.run_config = inputs.as_run_config(run)
        self.moving, self.fixed = inputs.as_image(moving, "moving"), inputs.as_image(fixed, "fixed")
        masks = [
            None if m is None else inputs.as_image(m, n)
            for m, n in ((moving_mask, "moving_mask"), (fixed_mask, "fixed_mask"))
        ]
        if self.moving.n_dims != self.fixed.n_dims:
            raise InputError(f"moving image is {self.moving.n_dims}D but fixed image is {self.fixed.n_dims}D")
        inputs.check_image(self.moving, "moving image")
        inputs.check_image(self.fixed, "fixed image")
        for img, name in ((self.moving, "moving image"), (self.fixed, "fixed image")):
            inputs.check_geometry(img, name, cfg)
        self.moving_mask, self.fixed_mask = (
            None if m is None else inputs.checked_mask(m, img, name)
            for m, img, name in zip(masks, (self.moving, self.fixed), ("moving mask", "fixed mask"), strict=True)
        )
        self.device = torch.device(self.run_config.device)
        inputs.check_device(self.device, self.run_config.device)
        inputs.check_memory(cfg, self.moving, self.fixed, self.device)
        self.make_optimizer = optimizer
        self.similarities = dict(SIMILARITIES if similarities is None else similarities)
        self.history: list[dict] = []
        self.search: dict | None = None
        self.contrast: dict | None = None
        self.interior_shares: dict | None = None
        self.cpu_share: CpuShare | None = None  # while ``run`` runs, where it shares its CPUs
        self.prealign = np.eye(self.fixed.n_dims + 1)

    def run(self) -> Registration:
        """All phases, on the run's thread count (the caller's restored after).

        Raises ``RegistrationDiverged`` (NaN loss beyond recovery); warns
        ``RegistrationWarning`` when the self-check finds the result doubtful or probably
        wrong (the verdict and its reasons are in ``info["quality"]``)."""
        share = self.run_config.share_cpus and self.device.type == "cpu"
        with run_threads(self.run_config.threads, share) as self.cpu_share:
            try:
                self.clock = (time.perf_counter(), time.process_time())
                self.make_fields()
                self.align()
                self.fit_fields()
                return self.result()
            finally:  # a phase called after the run leaves the process's thread count alone
                self.cpu_share = None
                if getattr(self, "pair", None) is not None:
                    self.pair.cpu_share = None

    def make_fields(self) -> None:
        """Phi_AB and Phi_BA, new (the identity), on the run's device and backend; the pair's
        box around both images."""
        cfg, d = self.config, self.fixed.n_dims
        generator = torch.Generator().manual_seed(cfg.seed)  # the initialization's own (CPU) stream
        self.phi_ab = NeuralField(d, cfg.field, generator).to(self.device)
        self.phi_ba = NeuralField(d, cfg.field, generator).to(self.device)
        for f in (self.phi_ab, self.phi_ba):
            f.set_backend(cfg.field.backend)
        shapes = [(self.moving.shape, self.moving.affine), (self.fixed.shape, self.fixed.affine)]
        self.pair = PairData(
            cfg,
            self.moving,
            self.fixed,
            self.moving_mask,
            self.fixed_mask,
            NormalizedBox.around(shapes, cfg.margin),
            self.device,
            self.phi_ab.encoding.backend == "native",
            similarity_points(cfg, self.fixed.shape),
            similarities=self.similarities,
            optimizer=self.make_optimizer,
            check_every=self.run_config.check_every or (1 if self.device.type == "cpu" else 10),
            cpu_share=self.cpu_share,
        )

    def align(self) -> None:
        """The global part: ``affine`` (frozen after), ``prealign``, ``pair`` in the frame of
        the chosen start, and the generator the fields draw on from (seeded by ``config.seed``)."""
        cfg = self.config
        if cfg.affine_steps == 0:
            self.affine = AffineMap(self.fixed.n_dims).to(self.device)
            self.generator = torch.Generator(device=self.device).manual_seed(cfg.seed)
            self.affine.requires_grad_(False)
            return
        self._find_interior()
        if cfg.affine_overlap:
            self.pair.fields_of_view = (field_of_view(self.pair.moving), field_of_view(self.pair.fixed))
        self.pair.poll_cpus()
        if cfg.affine_init == "search":
            fit, self.search = choose_start(self.pair, self.run_config.progress)
        else:
            fit = AffineFit(self.pair)
            fit.run(range(len(cfg.affine_pyramid)), self.run_config.progress)
        self.pair, self.prealign = fit.pair, fit.prealign
        self.history, self.affine, self.generator = list(fit.history), fit.affine, fit.generator
        self.affine.requires_grad_(False)

    def _find_interior(self) -> None:
        """The masks of the body's interior the affine fits draw from (``interior_within``,
        ``config.affine_interior_mm``), and each grid's share of them, where there is one."""
        cfg, pair = self.config, self.pair
        given = (pair.moving_mask, pair.fixed_mask)
        masks = tuple(
            interior_within(img, mask, cfg.affine_interior_mm)
            for img, mask in zip((pair.moving, pair.fixed), given, strict=True)
        )
        if all(m is g for m, g in zip(masks, given, strict=True)):
            return
        pair.interior_masks = masks
        self.interior_shares = {
            k: None if m is g else float((m.data > 0).float().mean())
            for k, m, g in zip(("moving", "fixed"), masks, given, strict=True)
        }

    def fit_fields(self) -> None:
        """Fit the two fields (the affine part fixed), coarse to fine: the pyramid's stages
        switch on the hash levels in turn; a NaN step or a similarity jump (``Watchdog``)
        rolls both fields back to the last healthy snapshot at half the learning rate; a
        windowed first stage that lost the images' shared information is fitted again with
        mutual information (``_check_first_stage``); one that leaves the images' windows
        correlating almost perfectly keeps local NCC in the later stages
        (``_check_one_contrast``)."""
        self.maps = (ComposedMap(self.phi_ab, self.affine, False), ComposedMap(self.phi_ba, self.affine, True))
        self._check_contrast()  # may set the first stage's similarity: self.config after it
        cfg = self.config
        self.learning_rate = cfg.learning_rate
        params = list(self.phi_ab.parameters()) + list(self.phi_ba.parameters())
        self.optimizer = self.make_optimizer(params, self.learning_rate)
        self.watchdog = Watchdog(cfg.divergence_tolerance, relative=False)  # set per stage
        self.snapshot, self.candidate = self._snapshot(), None  # committed, and awaiting a healthy check
        self.recoveries = self.rollbacks = self.step = 0
        self.bar = tqdm(total=cfg.steps, disable=not self.run_config.progress, desc="register", dynamic_ncols=True)
        start = self.snapshot  # the new fields (snapshots are replaced, never changed): where a refit begins
        try:
            for s, n_steps in enumerate(stage_steps(cfg)):
                self.fit_stage(s, n_steps)
                if s == 0 and self._check_first_stage():
                    self._refit_first_stage(start, n_steps)
                elif s == 0:
                    self._check_one_contrast()
        finally:
            self.bar.close()

    def _check_contrast(self) -> None:
        """Global NCC after the global part (``ncc_after_global``), on points of the first
        field stage drawn from a generator of their own (the run's draws stay as they are).
        Below ``INVERTED_NCC`` the two contrasts are inverted (tissues swap order): local NCC,
        which asks each window's intensities to rise together, then pulls the first stage the
        wrong way (a head in another contrast: the fields ran 48-81 mm off under three seeds,
        0.39 mm with mutual information; docs/benchmarks.md), so the first stage fits
        mutual information (``FIRST_STAGE_FALLBACK``) instead, and
        ``first_stage_similarity`` says so. Only where the first stage fits a windowed
        similarity and the later ones one that holds across contrasts (``losses.CROSS_CONTRAST``:
        the defaults, or ``mind_mi``); without a global part (``affine_steps=0``) the images'
        physical alignment is what is measured. Where the first stage stays windowed, the
        images' shared information after the global part (``nmi_after_global``,
        ``_shared_information``) is what ``_check_first_stage`` compares against."""
        cfg = self.config
        if cfg.similarity not in WINDOWED or cfg.fine_similarity not in CROSS_CONTRAST:
            return
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed + 104729)
        stage = self.pair.stage(cfg.pyramid[0], generator, self.pair.points, cfg.field_interior)
        with torch.no_grad():  # new fields are the identity: self.maps[0] is the global part
            warped, fixed_values = stage.warped(self.maps[0], "moving", "fixed", "ncc", fused=False)
            ncc = 1.0 - float(global_ncc(warped, fixed_values))  # not the run's similarity table: a measurement
        first = cfg.similarity
        if ncc < INVERTED_NCC:
            first = FIRST_STAGE_FALLBACK
            self._fit_first_stage_with(first)
        self.contrast = {"ncc_after_global": ncc, "first_stage_similarity": first}
        if first in WINDOWED:
            self.contrast["nmi_after_global"] = self._shared_information()

    def _fit_first_stage_with(self, similarity: str) -> None:
        """The first field stage fits ``similarity`` (``config`` and ``pair`` say so)."""
        self.config = dataclasses.replace(self.config, similarity=similarity)
        self.pair = dataclasses.replace(self.pair, cfg=self.config)

    def _shared_information(self) -> float:
        """Normalized mutual information of the two maps' warped images and their targets
        (mean of both directions), on uniform points of the first field stage (inside the
        body with ``config.field_interior``) drawn from a generator of their own: the same
        points at every call, so that two calls compare the maps alone (``_probe``)."""
        return self._probe(7919, "mi", 0.0, normalized_mi)

    def _probe(self, seed_offset: int, draw: str, edge_fraction: float | None, measure: Callable) -> float:
        """``measure(warped, target) -> float`` of both maps (mean of the two directions) on
        points of the first field stage drawn as for the similarity ``draw`` (windows for a
        windowed one), inside the body with ``config.field_interior``, ``edge_fraction`` of
        them on edges (None: ``config.edge_fraction``), from a generator of their own
        (``config.seed + seed_offset``): the run's draws stay as they are, and every call
        reads the same points."""
        cfg = self.config
        generator = torch.Generator(device=self.device).manual_seed(cfg.seed + seed_offset)
        stage = self.pair.stage(cfg.pyramid[0], generator, self.pair.points, cfg.field_interior, edge_fraction)
        values = []
        with torch.no_grad():
            for mapping, source, target in ((self.maps[0], "moving", "fixed"), (self.maps[1], "fixed", "moving")):
                warped, target_values = stage.warped(mapping, source, target, draw, fused=False)
                values.append(float(measure(warped, target_values)))
        return sum(values) / len(values)

    def _check_first_stage(self) -> bool:
        """Whether the first field stage, fitted with a windowed similarity (local NCC), lost
        more than ``LOST_NMI`` and more than ``LOST_NMI_SHARE`` of the images' shared
        information (``_shared_information`` - 1, a measure the stage does not optimize)
        against the global part alone: then local NCC's model, intensities that rise together
        window by window, does not hold for this pair (soft tissue of two subjects whose
        layers and contrasts differ), and it pulled the bones off the global part (on such
        knees by 0.09-0.39 bone Dice). ``nmi_after_first_stage`` in ``contrast``; the later
        stages often repair such a stage, not always."""
        if self.contrast is None or "nmi_after_global" not in self.contrast:
            return False
        before, after = self.contrast["nmi_after_global"], self._shared_information()
        self.contrast["nmi_after_first_stage"] = after
        return before - after > max(LOST_NMI, LOST_NMI_SHARE * (before - 1.0))

    def _local_correlation(self) -> float:
        """Local NCC of the two maps' warped images and their targets (mean of both
        directions), on windows of the first field stage (inside the body with
        ``config.field_interior``, ``config.edge_fraction`` of them on edges) drawn from a
        generator of their own (``_probe``)."""
        k = self.config.lncc_patch_points
        return self._probe(15485863, "lncc", None, lambda w, t: 1.0 - local_ncc(w.reshape(-1, k), t.reshape(-1, k)))

    def _check_one_contrast(self) -> None:
        """After a windowed first stage that was kept: where its local NCC
        (``_local_correlation``) reaches ``ONE_CONTRAST_LNCC``, the two images are one
        anatomy in one contrast (a scan and its follow-up, or a deformed copy), local NCC's
        model holds window by window, and the later stages fit it too (with
        ``config.edge_fraction`` in every stage: the middle stage's uniform points serve
        mutual information's histogram) instead of ``fine_similarity``: on scans against
        deformed copies of themselves it recovered the map more precisely than mutual
        information (docs/benchmarks.md). ``lncc_after_first_stage`` and
        ``later_similarity`` in ``contrast``."""
        cfg = self.config
        # ``contrast`` is set only where the first stage was to fit a windowed similarity and the
        # later ones mutual information; it still does unless inverted contrasts switched it
        if self.contrast is None or cfg.similarity not in WINDOWED or len(cfg.pyramid) < 2:
            return
        value = self._local_correlation()
        self.contrast["lncc_after_first_stage"] = value
        if value >= ONE_CONTRAST_LNCC:
            self.config = dataclasses.replace(cfg, fine_similarity=cfg.similarity, middle_edge_fraction=None)
            self.pair = dataclasses.replace(self.pair, cfg=self.config)
        self.contrast["later_similarity"] = stage_similarity(self.config, 1)

    def _refit_first_stage(self, start: Snapshot, n_steps: int) -> None:
        """The first stage again from the new fields (``start``), with mutual information
        (``FIRST_STAGE_FALLBACK``) instead of the windowed similarity that lost information; the
        steps it takes come on top of ``config.steps``, and ``contrast`` says so."""
        start.restore(self.phi_ab, self.phi_ba, self.optimizer)
        self.snapshot, self.candidate = start, None
        self.learning_rate = self.optimizer.lr = self.config.learning_rate
        self._fit_first_stage_with(FIRST_STAGE_FALLBACK)
        self.contrast.update(first_stage_similarity=self.config.similarity, first_stage_refit=True)
        self.bar.total += n_steps
        self.fit_stage(0, n_steps)

    def field_stage(self, s: int) -> Stage:
        """Pyramid stage ``s`` of the fields: its share of the similarity points, drawn
        inside the body with ``config.field_interior``, ``stage_edge_fraction`` of them on
        edges."""
        cfg, pair = self.config, self.pair
        points = max(8, round(pair.points * stage_point_shares(cfg)[s]))
        edges = stage_edge_fraction(cfg, s)
        return pair.stage(cfg.pyramid[s], self.generator, points, cfg.field_interior, edges, FIELD_DRAWS_AT_ONCE)

    def fit_stage(self, s: int, n_steps: int) -> None:
        """``n_steps`` steps of stage ``s``, the loss read every ``check_every`` steps (one host
        synchronisation each); a read that finds a NaN or a jump rolls back."""
        check_every = self.pair.check_every
        cfg, stage = self.config, self.field_stage(s)
        active = math.ceil(cfg.field.encoding.n_levels * (s + 1) / len(cfg.pyramid))
        for f in (self.phi_ab, self.phi_ba):
            f.encoding.set_active_levels(active)
        self.watchdog.reset()
        self.watchdog.relative = stage_similarity(cfg, s) in DATA_SCALED
        pending: list[tuple[int, int, torch.Tensor]] = []  # (step, stage, [loss, sim_ab, sim_ba, reg]) not yet read
        i = 0
        while i < n_steps:
            self.pair.poll_cpus()
            if self.step % SNAPSHOT_EVERY == 0 and self.candidate is None:
                self.candidate = self._snapshot()
            step = self.step
            terms, taken = self.field_step(stage, s, i, n_steps)
            pending.append((step, s, terms))
            i += taken
            if len(pending) < check_every and i < n_steps:
                continue
            event, read = self._read(pending), len(pending)
            pending = []
            if event is not None:
                self._roll_back(event)
                continue
            if self.candidate is not None and self.watchdog.healthy():
                self.snapshot, self.candidate = self.candidate, None
            self._show_progress(s, read)

    def field_step(self, stage: Stage, s: int, i: int, n_steps: int) -> tuple[torch.Tensor, bool]:
        """Step ``i`` of ``n_steps`` in stage ``s``: the loss, and the optimizer's update unless
        the loss is NaN where it is read every step (the CPU: the step is retried). Returns
        ([loss, sim_ab, sim_ba, reg] detached, whether the update was taken)."""
        cfg, optimizer = self.config, self.optimizer
        if s == len(cfg.pyramid) - 1 and cfg.final_lr_fraction != 1.0:
            frac = cfg.final_lr_fraction
            cosine = 0.5 * (1 + math.cos(math.pi * i / max(n_steps, 1)))
            optimizer.lr = self.learning_rate * (frac + (1 - frac) * cosine)
        optimizer.zero_grad()
        map_ab, map_ba = self.maps
        similarity = stage_similarity(cfg, s)
        sim_ab, sim_ba, reg = stage.terms(map_ab, map_ba, similarity, regularizer_points(cfg, self.pair.points))
        loss = sim_ab + sim_ba + cfg.regularizer_weight * reg
        terms = torch.stack([loss, sim_ab, sim_ba, reg.to(loss.dtype)]).detach()
        if self.pair.check_every == 1 and not bool(torch.isfinite(loss)):
            return terms, False
        loss.backward()
        optimizer.step()
        self.step += 1
        self.bar.update(1)
        return terms, True

    def _read(self, pending: list) -> str | None:
        """The pending steps' terms, read in one host synchronisation, into ``history`` in
        order; "nan" or "jump" (the watchdog, while rollbacks are left) ends the read."""
        rows = torch.stack([t for _, _, t in pending]).tolist()
        for (k, s, _), (v_loss, v_ab, v_ba, v_reg) in zip(pending, rows, strict=True):
            if not math.isfinite(v_loss):
                return "nan"
            self.history.append(
                {"step": k, "stage": s, "part": "fields", "loss": v_loss, "sim_ab": v_ab, "sim_ba": v_ba, "reg": v_reg}
            )
            if self.watchdog.update(v_ab, v_ba) and self.rollbacks < self.config.max_recoveries:
                return "jump"
        return None

    def _roll_back(self, event: str) -> None:
        """Back to the last healthy snapshot at half the learning rate; ``RegistrationDiverged``
        after ``config.max_recoveries`` NaN recoveries."""
        cfg = self.config
        if event == "nan":
            self.recoveries += 1
            if self.recoveries > cfg.max_recoveries:
                raise RegistrationDiverged(
                    f"loss became non-finite at step {self.step} after {cfg.max_recoveries} recoveries; "
                    "lower the learning rate or raise the regularizer weight"
                )
        else:
            self.rollbacks += 1
        self.snapshot.restore(self.phi_ab, self.phi_ba, self.optimizer)
        self.candidate = None
        self.learning_rate /= 2
        self.optimizer.lr = self.learning_rate

    def _show_progress(self, s: int, read: int) -> None:
        """The progress bar's terms, every 10 steps."""
        last = self.history[-1] if self.history else None
        if last and self.run_config.progress and last["step"] // 10 != (last["step"] - read) // 10:
            self.bar.set_postfix(stage=s, sim=f"{last['sim_ab']:.4f}/{last['sim_ba']:.4f}", reg=f"{last['reg']:.2e}")

    def _snapshot(self) -> Snapshot:
        return Snapshot(self.phi_ab, self.phi_ba, self.optimizer)

    def result(self) -> Registration:
        """The ``Registration`` (both fields, the global part, history, run facts) with its
        self-check in ``info["quality"]``; a ``RegistrationWarning`` unless it is ``good``."""
        cfg, pair = self.config, self.pair
        elapsed = time.perf_counter() - self.clock[0]
        info = {
            "seconds": elapsed,
            "cpu_seconds": time.process_time() - self.clock[1],  # all threads of this process
            "seconds_per_step": elapsed / max(cfg.steps, 1),
            "recoveries": self.recoveries,
            "rollbacks": self.rollbacks,
            "final_learning_rate": self.learning_rate,
            "backend": self.phi_ab.encoding.backend,
            "points": pair.points,
            "regularizer_points": regularizer_points(cfg, pair.points),
            "final": self.history[-1] if self.history else {},
            "affine_steps": cfg.affine_steps,
            "search": self.search,
            # share of each grid the affine fits (and with field_interior the fields' similarity
            # points) drew from (None: all of it, or the mask given)
            "affine_interior": self.interior_shares,
            # global NCC after the global part, and what the first field stage fitted (``_check_contrast``)
            "contrast": self.contrast,
            "run": self.run_config.to_dict(),
            # the threads the run used: its count, and where it shared its CPUs (``threads.CpuShare``)
            # each change of the count for other processes' load
            "threads": {
                "count": torch.get_num_threads() if self.cpu_share is None else self.cpu_share.most,
                "changes": [] if self.cpu_share is None else list(self.cpu_share.changes),
            },
        }
        reg = Registration(
            self.phi_ab,
            self.phi_ba,
            pair.box,
            (self.fixed.shape, self.fixed.affine),
            (self.moving.shape, self.moving.affine),
            cfg,
            self.history,
            info,
            affine=self.affine.matrix().detach().cpu().double().numpy(),
            prealign=self.prealign,
        )
        # scored where the fields drew their similarity points: inside the body with field_interior
        scored = pair.interior_masks[1] if cfg.field_interior and pair.interior_masks is not None else None
        quality = assess(reg, self.moving, self.fixed, fixed_mask=None if scored is None else scored.data > 0)
        info["quality"] = quality.to_dict()
        if quality.verdict != "good":
            warnings.warn(f"registration quality {quality.summary()}", RegistrationWarning, stacklevel=_caller_level())
        return reg


def _caller_level() -> int:
    """The ``stacklevel`` of the first frame outside the neuralreg package, as seen from the
    function that calls this: a warning then names the user's line, whichever door they used."""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    frame, level = inspect.currentframe().f_back, 1
    while frame is not None and frame.f_code.co_filename.startswith(package + os.sep):
        frame, level = frame.f_back, level + 1
    return level
