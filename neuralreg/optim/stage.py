"""What one step of a fit reads: the pair (``PairData``) and one level of its pyramid (``Stage``).

Coordinates: a stage's points are voxel indices (N, d) of its down-sampled image, in
array-axis order; the maps take normalized coordinates of the pair's ``NormalizedBox``
(``Stage.vox_to_u``/``u_to_vox``, ``PointMap`` s, convert). The similarity of a term is a name looked up
in ``PairData.similarities`` (``losses.SIMILARITIES`` unless a run is given its own table).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Mapping

import torch

from neuralreg.config import RegistrationConfig
from neuralreg.geometry.coordinates import NormalizedBox, PointMap
from neuralreg.geometry.image import Image
from neuralreg.geometry.interpolation import sample_image
from neuralreg.losses import BATCHED, DESCRIPTORS, REGULARIZERS, SIMILARITIES, WINDOWED
from neuralreg.optim.adam import Adam
from neuralreg.optim.points import VoxelSampler, edge_weights
from neuralreg.optim.threads import CpuShare


@dataclasses.dataclass
class PairData:
    """One pair as every step of a fit reads it: the moving image (and mask) in the frame of
    a start, the fixed image, the normalized box around both, and how the run computes.

    ``interior_masks``: (moving, fixed) masks of the body's interior
    (``alignment.interior_within``) that the affine fits, and the fields with
    ``config.field_interior``, draw their similarity points from; the moving one in the
    frame of the start; None: the masks given. ``fields_of_view``: (moving, fixed) where
    each image holds data (``points.field_of_view``, on its own grid), which the affine
    fits' mutual information counts only (``losses.similarity.overlap_mi``); None: all of
    each grid. ``similarities``: similarity name -> loss
    ``(warped, target) -> scalar``. ``optimizer``: ``(parameters, learning_rate) ->`` an
    optimizer with ``lr``, ``zero_grad``, ``step``, ``state_dict`` and ``load_state_dict``.
    """

    cfg: RegistrationConfig
    moving: Image
    fixed: Image
    moving_mask: Image | None
    fixed_mask: Image | None
    box: NormalizedBox
    device: torch.device
    fused_warp: bool
    points: int  # similarity points per direction and step (``config.similarity_points``)
    interior_masks: tuple | None = None
    fields_of_view: tuple | None = None  # (moving, fixed) float (*shape) of ``points.field_of_view``
    similarities: Mapping[str, Callable] = dataclasses.field(default_factory=lambda: dict(SIMILARITIES))
    optimizer: Callable = Adam
    check_every: int = 1  # steps between host reads of the loss (``RunConfig.check_every``)
    cpu_share: CpuShare | None = None  # the run's threads where it shares its CPUs: polled between steps

    def poll_cpus(self) -> None:
        """Between two steps: the run's thread count follows other processes' load
        (``threads.CpuShare``), where the run shares its CPUs."""
        if self.cpu_share is not None:
            self.cpu_share.poll()

    def stage(
        self,
        factor: int,
        generator: torch.Generator,
        points: int,
        inside_body: bool = False,
        edge_fraction: float | None = None,
        draws_at_once: int = 1,
    ) -> Stage:
        """The pyramid level ``factor`` with ``points`` similarity points per step, drawn from
        the interior masks where ``inside_body`` (and there are some), ``edge_fraction`` of
        them on edges (None: ``config.edge_fraction``), for ``draws_at_once`` steps at a
        time (``VoxelSampler``)."""
        return Stage(self, factor, generator, points, inside_body, edge_fraction, draws_at_once)


# the fields' stages draw their points for this many steps at once (``VoxelSampler``): on
# the knee phantom's step 471 -> 432 operations (docs/benchmarks.md), each a launch on a GPU
FIELD_DRAWS_AT_ONCE = 8


class Stage:
    """One pyramid level of a pair: down-sampled images, their voxel <-> normalized maps, the
    samplers of similarity points (edge-weighted as configured, within the masks) and of
    regularizer points (uniform; everywhere the given masks allow when the similarity
    draws inside the body), each drawing for ``draws_at_once`` steps at a time."""

    def __init__(
        self,
        pair: PairData,
        factor: int,
        generator: torch.Generator,
        points: int,
        inside_body: bool,
        edge_fraction: float | None = None,
        draws_at_once: int = 1,
    ):
        cfg, device = pair.cfg, pair.device
        edges = cfg.edge_fraction if edge_fraction is None else edge_fraction
        self.pair, self.points = pair, points  # similarity points per direction and step
        given = (pair.moving_mask, pair.fixed_mask)
        masks = pair.interior_masks if inside_body and pair.interior_masks is not None else given
        self.moving = pair.moving.to(device).downsample(factor)
        self.fixed = pair.fixed.to(device).downsample(factor)
        self.moving_sampler, self.fixed_sampler = (
            VoxelSampler(
                img.shape,
                stage_mask(mask, factor, device),
                generator,
                weights=edge_weights(img.data, cfg.edge_power) if edges > 0 else None,
                weighted_fraction=edges,
                device=device,
                draws_at_once=draws_at_once,
            )
            for img, mask in ((self.moving, masks[0]), (self.fixed, masks[1]))
        )
        self.regularizer_samplers = (self.moving_sampler, self.fixed_sampler)
        if masks is not given:
            self.regularizer_samplers = tuple(
                VoxelSampler(
                    img.shape, stage_mask(mask, factor, device), generator, device=device, draws_at_once=draws_at_once
                )
                for img, mask in zip((self.moving, self.fixed), given, strict=True)
            )
        self.vox_to_u = {
            k: PointMap(pair.box.voxel_to_normalized_matrix(img.affine), device)
            for k, img in (("moving", self.moving), ("fixed", self.fixed))
        }
        self.u_to_vox = {k: v.inverse() for k, v in self.vox_to_u.items()}
        self.factor = factor
        self._descriptors: dict = {}  # similarity -> name -> (*shape, C), ``descriptors``

    @functools.cached_property
    def fields_of_view(self) -> dict | None:
        """Name -> the image's field of view at this level (the share of each voxel that holds
        data), None without ``PairData.fields_of_view``; made on first use (the affine fits'
        levels read it, the fields' stages do not)."""
        pair = self.pair
        if pair.fields_of_view is None:
            return None
        return {
            k: img.with_data(Image(fov, src.affine).to(pair.device).downsample(self.factor).data)
            for k, img, src, fov in zip(
                ("moving", "fixed"),
                (self.moving, self.fixed),
                (pair.moving, pair.fixed),
                pair.fields_of_view,
                strict=True,
            )
        }

    def draw(self, target: str, similarity: str, fused: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The similarity's points in the ``target``'s domain ("moving" or "fixed"), voxel
        indices (N, d), and the target's values there (N,): all that a term draws from the
        generator and reads of its target. ``fused``: the native kernel reads the values
        (default: ``PairData.fused_warp``)."""
        cfg, device = self.pair.cfg, self.pair.device
        sampler = self.fixed_sampler if target == "fixed" else self.moving_sampler
        image = self.fixed if target == "fixed" else self.moving
        if similarity in WINDOWED:
            k = cfg.lncc_patch_points
            vox = sampler.sample_windows(max(1, self.points // k), k, cfg.lncc_window).to(device)
        else:
            vox = sampler.sample(self.points).to(device)
        fused = self.pair.fused_warp if fused is None else fused
        if similarity in DESCRIPTORS:
            return vox, self._sample_descriptors(self.descriptors(similarity)[target], vox, fused)
        if fused:
            from neuralreg.fields import native

            return vox, native.sample_values(image.data.float(), vox.float())
        return vox, image.sample(vox)

    def descriptors(self, similarity: str) -> dict:
        """Name ("moving", "fixed") -> the level's descriptor volume that ``similarity`` reads
        (``losses.DESCRIPTORS``), made on first use: channel-last (*shape, C), so that a
        point's C values lie together (the fused warp reads them with one set of weights)."""
        if similarity not in self._descriptors:
            make = DESCRIPTORS[similarity]
            self._descriptors[similarity] = {
                name: make(image.data).movedim(0, -1).contiguous()
                for name, image in (("moving", self.moving), ("fixed", self.fixed))
            }
        return self._descriptors[similarity]

    @staticmethod
    def _sample_descriptors(volume: torch.Tensor, vox: torch.Tensor, fused: bool) -> torch.Tensor:
        """A channel-last descriptor ``volume`` (*shape, C) at voxel-index points (N, d) -> (N, C),
        differentiable in the points: by the fused native warp, or ``sample_image``."""
        if fused:
            from neuralreg.fields import native

            if vox.requires_grad:
                return native.warp(volume, vox.float())
            return native.sample_values(volume, vox.float())
        return sample_image(volume.movedim(-1, 0), vox)

    def warped(
        self, mapping, source: str, target: str, similarity: str, draw: tuple | None = None, fused: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(source o mapping at points drawn in the target's domain (N,), the target's values
        there (N,)): ``draw`` a ``draw`` to use instead of a new one for ``similarity``;
        ``mapping`` takes and returns normalized points."""
        fused = self.pair.fused_warp if fused is None else fused
        vox, target_vals = draw if draw is not None else self.draw(target, similarity, fused)
        evaluate = getattr(mapping, "forward_once", mapping)  # a map's one-node pass where it has one
        mapped = evaluate(self.vox_to_u[target](vox))
        return self._sample_mapped(mapped, source, fused, similarity), target_vals

    def _sample_mapped(self, mapped: torch.Tensor, source: str, fused: bool, similarity: str = "") -> torch.Tensor:
        """The ``source`` image at normalized points ``mapped`` (N, d) -> (N,), or the
        descriptors ``similarity`` reads -> (N, C)."""
        if similarity in DESCRIPTORS:
            return self._sample_descriptors(self.descriptors(similarity)[source], self.u_to_vox[source](mapped), fused)
        image = self.moving if source == "moving" else self.fixed
        return sample(image, self.u_to_vox[source](mapped), fused)

    def similarity(
        self, mapping, source: str, target: str, similarity: str, draw: tuple | None = None, fused: bool | None = None
    ) -> torch.Tensor:
        """sim(source o mapping, target) at points drawn in the target's domain (``draw``: a
        ``draw`` to use instead of a new one); ``mapping`` takes and returns normalized points."""
        warped, target_vals = self.warped(mapping, source, target, similarity, draw, fused)
        return self.pair.similarities[similarity](*self._windowed(similarity, warped, target_vals))

    def _windowed(self, similarity: str, *samples: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``samples`` (..., N) as the similarity takes them: (..., P, K) windows of
        ``config.lncc_patch_points`` for a windowed one, as they are otherwise."""
        if similarity not in WINDOWED:
            return samples
        k = self.pair.cfg.lncc_patch_points
        return tuple(x.reshape(*x.shape[:-1], -1, k) for x in samples)

    def similarity_both_ways(self, map_ab, map_ba, similarity: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(sim(A o map_ab, B), sim(B o map_ba, A)) at points drawn in B's and A's domains (in
        that order, as two ``similarity`` calls draw them). A similarity in ``BATCHED`` sees
        both directions as one batch of two: one call (half the operations of two)."""
        loss = self.pair.similarities[similarity]
        if loss not in BATCHED:
            return (
                self.similarity(map_ab, "moving", "fixed", similarity),
                self.similarity(map_ba, "fixed", "moving", similarity),
            )
        ab = self.warped(map_ab, "moving", "fixed", similarity)
        ba = self.warped(map_ba, "fixed", "moving", similarity)
        warped, target = self._windowed(similarity, torch.stack([ab[0], ba[0]]), torch.stack([ab[1], ba[1]]))
        return loss(warped, target).unbind()

    def terms(self, map_ab, map_ba, similarity: str, n_points: int) -> tuple[torch.Tensor, ...]:
        """(sim(A o map_ab, B), sim(B o map_ba, A), lambda's term) of one step: the same
        points and values as ``similarity_both_ways`` and then ``regularizer``. Where the
        regularizer evaluates both maps anyway (``Regularizer.both_ways``: GradICON with
        analytic Jacobians) and the similarity is ``BATCHED``, the similarity's points ride
        in its passes (``values_at``): three passes of the maps a step instead of five."""
        cfg = self.pair.cfg
        loss = self.pair.similarities[similarity]
        entry = REGULARIZERS[cfg.regularizer]
        both_ways = None
        if entry is not None and entry.both_ways is not None and cfg.regularizer_weight != 0 and loss in BATCHED:
            both_ways = entry.both_ways(cfg, self.pair.box)
        if both_ways is None:
            sim_ab, sim_ba = self.similarity_both_ways(map_ab, map_ba, similarity)
            return sim_ab, sim_ba, self.regularizer(map_ab, map_ba, n_points)
        fused = self.pair.fused_warp
        draw_ab, draw_ba = self.draw("fixed", similarity), self.draw("moving", similarity)
        u_moving, u_fixed = self._regularizer_points(n_points)
        at = (self.vox_to_u["fixed"](draw_ab[0]), self.vox_to_u["moving"](draw_ba[0]))
        reg, (y_ab, y_ba) = both_ways(map_ab, map_ba, u_moving, u_fixed, values_at=at)
        warped = torch.stack(
            [
                self._sample_mapped(y_ab, "moving", fused, similarity),
                self._sample_mapped(y_ba, "fixed", fused, similarity),
            ]
        )
        target = torch.stack([draw_ab[1], draw_ba[1]])
        sim_ab, sim_ba = loss(*self._windowed(similarity, warped, target)).unbind()
        return sim_ab, sim_ba, reg

    def _regularizer_points(self, n_points: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Half of ``n_points`` uniform points in each domain (moving, then fixed), normalized (N, d)."""
        n = max(1, n_points // 2)
        moving_sampler, fixed_sampler = self.regularizer_samplers
        device = self.pair.device
        u_moving = self.vox_to_u["moving"](moving_sampler.sample(n, weighted=False).to(device))
        u_fixed = self.vox_to_u["fixed"](fixed_sampler.sample(n, weighted=False).to(device))
        return u_moving, u_fixed

    def regularizer(self, map_ab, map_ba, n_points: int) -> torch.Tensor:
        """lambda's term; ``map_*`` are the full maps (affine o field), ``n_points`` points a step.

        Inverse-consistency terms are evaluated both ways, half the points each:
        Phi_AB o Phi_BA at points of the moving domain and Phi_BA o Phi_AB at points of the
        fixed domain, so that neither map is left unregularized where the other does not
        reach (e.g. fixed points that the affine part maps outside the moving image).
        """
        cfg, device = self.pair.cfg, self.pair.device
        if cfg.regularizer == "none" or cfg.regularizer_weight == 0:
            return torch.zeros((), device=device)
        u_moving, u_fixed = self._regularizer_points(n_points)
        entry = REGULARIZERS[cfg.regularizer]
        both_ways = entry.both_ways(cfg, self.pair.box) if entry.both_ways is not None else None
        if both_ways is not None:
            return both_ways(map_ab, map_ba, u_moving, u_fixed)
        term = entry.make(cfg, self.pair.box)
        if entry.fields_only:  # the fields only, not the global affine part
            return term(map_ab.field, map_ba.field, torch.cat([u_moving, u_fixed]))
        return 0.5 * (term(map_ab, map_ba, u_moving) + term(map_ba, map_ab, u_fixed))


def sample(image: Image, vox: torch.Tensor, fused: bool) -> torch.Tensor:
    """``image`` at voxel points (N, d), linear, 0 outside its grid, differentiable in the
    points: the native fused value + gradient kernel where ``fused``."""
    if fused:
        from neuralreg.fields import native

        return native.warp(image.data.float(), vox)
    return image.sample(vox)


def stage_mask(mask: Image | None, factor: int, device) -> torch.Tensor | None:
    """``mask`` at pyramid factor ``factor`` (bool): the coarse voxels it covers at least half of."""
    if mask is None:
        return None
    share = mask.with_data((mask.data != 0).float()).to(device).downsample(factor).data
    inside = share > 0.5
    return inside if bool(inside.any()) else share > 0  # a mask thinner than a coarse voxel: where it reaches


def stage_steps(config: RegistrationConfig) -> list[int]:
    """Steps of each pyramid stage (they add up to ``config.steps``)."""
    total = sum(config.stage_fractions)
    steps = [round(config.steps * f / total) for f in config.stage_fractions]
    steps[-1] = config.steps - sum(steps[:-1])
    return steps
