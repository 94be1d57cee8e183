"""Random point sampling in an image's voxel space (points, never whole volumes)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from neuralreg.geometry.image import Image


def edge_weights(image: torch.Tensor, power: float = 1.0) -> torch.Tensor:
    """Gradient magnitude of ``image`` (*spatial) to the ``power``, central differences in voxel units, float32.

    ``power`` < 1 flattens the weights: a weak edge (bone against muscle) is drawn nearly as
    often as a strong one (fat against muscle), which suits local NCC, whose windows count
    alike whatever their contrast.
    """
    data = image.float()
    grads = torch.gradient(data)
    magnitude = torch.sqrt(sum(g * g for g in grads))
    return magnitude if power == 1.0 else magnitude.pow(power)


INTERIOR_GRID_MM = 3.0  # the body is found on a grid about this coarse
INTERIOR_THRESHOLD = 0.15  # background: below this share of the 99th percentile there
INTERIOR_CLOSING_MM = 6.0  # dark gaps inside the body narrower than twice this are bridged
INTERIOR_MIN_SHARE = 0.05  # an interior with fewer of the grid's voxels is not used


def interior_mask(image: Image, depth_mm: float) -> torch.Tensor | None:
    """Voxels at least ``depth_mm`` inside the body, away from its outline: bool (*shape).

    On the image box-averaged to ~``INTERIOR_GRID_MM``: what is brighter than
    ``INTERIOR_THRESHOLD`` x its 99th percentile, closed by ``INTERIOR_CLOSING_MM`` (dark
    layers such as the skull or cortical bone bridged) with its holes filled (ventricles,
    joint fluid), is the body; a voxel is interior when no voxel outside the body lies
    within ``depth_mm`` along every axis (a box; separable max-pooling). The grid's own
    edges are not an outline: a limb that leaves the field of view stays interior there.

    Between subjects the outline and the fat under the skin differ (soft-tissue
    thickness, body size) while the anatomy inside corresponds; a global fit drawn
    towards the outline misplaces the bones (see ``config.affine_interior_mm``).

    Returns:
        the mask on the image's grid, or None where ``depth_mm`` <= 0 or the interior
        would hold less than ``INTERIOR_MIN_SHARE`` of the voxels (a thin or small object).
    """
    if depth_mm <= 0:
        return None
    factor = max(1, round(INTERIOR_GRID_MM / float(image.spacing.min())))
    coarse = image.downsample(factor) if min(image.shape) >= 2 * factor else image
    x = coarse.data.float()
    positive = x[x > 0]
    if positive.numel() == 0:
        return None
    level = INTERIOR_THRESHOLD * float(torch.quantile(positive[:: max(1, positive.numel() // 100000)], 0.99))
    closing = [math.ceil(INTERIOR_CLOSING_MM / float(step)) for step in coarse.spacing]
    body = ~_grow(~_grow(x >= level, closing), closing)
    body = ~_reached_from_border(~body)  # holes filled
    inside = ~_grow(~body, [math.ceil(depth_mm / float(step)) for step in coarse.spacing])
    if coarse is not image:
        for axis, n in enumerate(image.shape):  # voxel i lies in coarse voxel i // factor
            index = (torch.arange(n, device=inside.device) // factor).clamp(max=inside.shape[axis] - 1)
            inside = inside.index_select(axis, index)
    if float(inside.float().mean()) < INTERIOR_MIN_SHARE:
        return None
    return inside


def field_of_view(image: Image) -> torch.Tensor:
    """Where ``image`` holds data: float (*shape), 0 in its zero padding, 1 elsewhere.

    A scan resampled onto a larger grid, or cropped, is padded with a constant where its
    field of view ends; preprocessing maps that constant to the image's minimum. Padding
    is where the image is at its minimum over whole blocks: the minimum's voxels whose
    3^d neighbourhood is at the minimum too, grown back by one voxel (a morphological
    opening). Dark tissue and noisy air reach the minimum in scattered voxels only, so
    they stay data.
    """
    x = image.data
    low = x <= x.min()
    ones = [1] * x.dim()
    padding = _grow(~_grow(~low, ones), ones) & low
    return (~padding).float()


def _grow(mask: torch.Tensor, radii) -> torch.Tensor:
    """Box dilation of a bool mask by ``radii`` voxels per axis; beyond the grid's edge is unset."""
    m = mask.float()
    for axis, r in enumerate(radii):
        moved = m.movedim(axis, -1)
        flat = moved.reshape(-1, 1, moved.shape[-1])
        # max_pool pads with -inf: the grid's edge adds nothing
        m = F.max_pool1d(flat, 2 * r + 1, stride=1, padding=r).reshape(moved.shape).movedim(-1, axis)
    return m > 0.5


def _reached_from_border(free: torch.Tensor) -> torch.Tensor:
    """The voxels of ``free`` connected to the grid's border through ``free`` (flood fill, 26-neighbours)."""
    d = free.dim()
    pool = F.max_pool3d if d == 3 else F.max_pool2d
    seed = torch.zeros_like(free)
    for axis in range(d):
        for end in (0, -1):
            index = [slice(None)] * d
            index[axis] = end
            seed[tuple(index)] = free[tuple(index)]
    reached, allowed = seed.float()[None, None], free.float()[None, None]
    while True:
        grown = pool(reached, 3, stride=1, padding=1) * allowed
        if torch.equal(grown, reached):
            return reached[0, 0] > 0.5
        reached = grown


class VoxelSampler:
    """Uniform continuous points inside a grid, or around the voxels of a mask.

    Args:
        shape: grid shape (d,).
        mask: optional boolean tensor of ``shape``; points are drawn from its voxels,
            each jittered uniformly within its voxel.
        generator: torch.Generator for reproducible draws.
        weights: optional non-negative tensor of ``shape`` (e.g. ``edge_weights``):
            ``weighted_fraction`` of each draw picks voxels with probability proportional
            to it (inside the mask), jittered within the voxel; the rest stays uniform.
        weighted_fraction: share of points drawn by ``weights`` (0: all uniform).
        device: where points are drawn (``generator`` must live there too); the mask and
            weights are moved there once.
        draws_at_once: each kind of draw (``sample`` of n points, ``sample_windows`` of a
            shape) is made for this many calls at once and handed out one call's share at a
            time: a few operations a call instead of a dozen (a GPU step is bound by its
            launches), the same distribution, another order of the generator's numbers.
    """

    def __init__(
        self,
        shape,
        mask: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        weights: torch.Tensor | None = None,
        weighted_fraction: float = 0.0,
        device: torch.device | str = "cpu",
        draws_at_once: int = 1,
    ):
        if draws_at_once < 1:
            raise ValueError("draws_at_once must be at least 1")
        self.shape = tuple(shape)
        self.draws_at_once = draws_at_once
        self._pools: dict[tuple, list] = {}  # kind of draw -> [(calls, ...) draws, calls handed out]
        self.generator = generator
        self.device = torch.device(device)
        self.upper = torch.tensor([n - 1 for n in self.shape], dtype=torch.float32, device=self.device)
        self.mask_voxels = None
        if mask is not None:
            mask = mask.to(self.device)
            idx = torch.nonzero(mask.reshape(self.shape) > 0)
            if idx.shape[0] == 0:
                raise ValueError("the mask is empty")
            self.mask_voxels = idx.float()
        if not 0.0 <= weighted_fraction <= 1.0:
            raise ValueError("weighted_fraction must be in [0, 1]")
        self.weighted_fraction = weighted_fraction if weights is not None else 0.0
        self.cdf = None
        if self.weighted_fraction > 0:
            w = weights.to(self.device).reshape(self.shape).double().clamp(min=0)
            if mask is not None:
                w = w * (mask.reshape(self.shape) > 0)
            if float(w.sum()) > 0:
                self.cdf = torch.cumsum(w.reshape(-1), 0)
            else:  # a constant image: nothing to weight by
                self.weighted_fraction = 0.0

    def _uniform(self, n: int) -> torch.Tensor:
        d = len(self.shape)
        if self.mask_voxels is None:
            return torch.rand(n, d, generator=self.generator, device=self.device) * self.upper
        pick = torch.randint(0, self.mask_voxels.shape[0], (n,), generator=self.generator, device=self.device)
        return self._jittered(self.mask_voxels[pick])

    def _weighted(self, n: int) -> torch.Tensor:
        u = torch.rand(n, dtype=torch.float64, generator=self.generator, device=self.device) * self.cdf[-1]
        flat = torch.searchsorted(self.cdf, u, right=True).clamp(max=self.cdf.shape[0] - 1)
        return self._jittered(_unravel(flat, self.shape).float())

    def _jittered(self, voxels: torch.Tensor) -> torch.Tensor:
        """Voxel centres (n, d) moved uniformly within their voxels, kept inside the grid."""
        jitter = torch.rand(voxels.shape, generator=self.generator, device=self.device) - 0.5
        return (voxels + jitter).clamp(min=0).minimum(self.upper)

    def sample(self, n: int, weighted: bool = True) -> torch.Tensor:
        """(n, d) voxel-index points; ``weighted=False`` ignores the weights."""
        return self._handed_out(("points", n, weighted), lambda calls: self._points(calls, n, weighted))

    def sample_windows(self, n_windows: int, points_per_window: int, window: float) -> torch.Tensor:
        """(n_windows * points_per_window, d) points, grouped by window (side ``window`` voxels)."""
        key = ("windows", n_windows, points_per_window, window)
        return self._handed_out(key, lambda calls: self._windows(calls, n_windows, points_per_window, window))

    def _handed_out(self, key: tuple, draw) -> torch.Tensor:
        """The next call's share of the draws of kind ``key``, ``draw(calls)`` (calls, ...)
        made anew when those made are handed out (``draws_at_once``)."""
        pool = self._pools.get(key)
        if pool is None or pool[1] == pool[0].shape[0]:
            pool = self._pools[key] = [draw(self.draws_at_once), 0]
        pool[1] += 1
        return pool[0][pool[1] - 1]

    def _points(self, calls: int, n: int, weighted: bool) -> torch.Tensor:
        """(calls, n, d): each call's n points, the weighted share of each call first."""
        d = len(self.shape)
        n_w = round(n * self.weighted_fraction) if weighted and self.cdf is not None else 0
        if n_w == 0:
            return self._uniform(calls * n).view(calls, n, d)
        if n_w == n:
            return self._weighted(calls * n).view(calls, n, d)
        weighted_part = self._weighted(calls * n_w).view(calls, n_w, d)
        return torch.cat([weighted_part, self._uniform(calls * (n - n_w)).view(calls, n - n_w, d)], 1)

    def _windows(self, calls: int, n_windows: int, points_per_window: int, window: float) -> torch.Tensor:
        """(calls, n_windows * points_per_window, d): each call's windows, a centre and
        ``points_per_window`` points around it each."""
        d = len(self.shape)
        centers = self._points(calls, n_windows, True)
        shape = (calls, n_windows, points_per_window, d)
        offsets = (torch.rand(shape, generator=self.generator, device=self.device) - 0.5) * window
        return (centers[:, :, None, :] + offsets).view(calls, -1, d)


def _unravel(flat: torch.Tensor, shape) -> torch.Tensor:
    """(n, d) voxel indices of C-order flat indices (n,): ``torch.unravel_index`` stacked, without
    its type check's import of ``torch.fx.experimental.symbolic_shapes`` and sympy (0.3 s)."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * int(shape[i + 1])
    strides_t = torch.tensor(strides, dtype=flat.dtype, device=flat.device)
    shape_t = torch.tensor([int(n) for n in shape], dtype=flat.dtype, device=flat.device)
    return torch.div(flat[:, None], strides_t, rounding_mode="floor") % shape_t
