"""Similarity losses on sampled intensities (lower is better).

``warped`` and ``fixed`` are (N,) for the global measures and (P, K) for local NCC
(P windows of K points each). Leading axes before those are a batch of independent
samples (the affine fits of several starts at once): (B, N) or (B, P, K) give (B,) losses.

- ``ncc`` and ``lncc`` assume intensities related linearly (globally, or within each
  window): same modality and contrast.
- ``mi`` (mutual information) assumes only that intensities are statistically dependent:
  it does not care which tissue is brighter, so it holds across contrasts (fat suppressed
  or not, T1 against T2) and where the soft tissue of two subjects has its own intensities.
  It is what ANTs and elastix use for their global stages.
- ``lncc_mi`` adds the two: local NCC pulls each window onto structure that corresponds,
  mutual information over all the windows' points keeps tissue classes on tissue classes
  where it does not (the soft tissue of two subjects, two contrasts). Its inputs are local
  NCC's (P, K).
"""

from __future__ import annotations

import torch

_EPS = 1e-5


def mse(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared intensity difference over the last axis."""
    return ((warped - fixed) ** 2).mean(-1)


def _ncc(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    cov = (a * b).mean(dim)
    var = (a * a).mean(dim) * (b * b).mean(dim)
    return cov / torch.sqrt(var + _EPS**2)


def ncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """1 - global normalized cross-correlation over the points (the last axis)."""
    return 1.0 - _ncc(warped, fixed, -1)


def lncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """1 - mean local NCC over windows: inputs (P, K)."""
    return 1.0 - _ncc(warped, fixed, -1).mean(-1)


MI_BINS = 32
WINDOWED = ("lncc", "lncc_mi")  # the similarities that take windows of points (P, K)


def _spline_bins(x: torch.Tensor, bins: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic B-spline Parzen window: each value of ``x`` (..., N) spread over its three
    nearest of ``bins`` bins spanning its sample's own range. Returns (bin indices (..., 3, N),
    weights (..., 3, N), summing to 1 over the three, differentiable in ``x``); the points
    run along the last axis, so that products and sums over the three run on contiguous rows."""
    lo, hi = x.detach().amin(-1, keepdim=True), x.detach().amax(-1, keepdim=True)
    t = (x - lo) / (hi - lo).clamp(min=_EPS) * (bins - 3) + 1  # centres 1 .. bins-2: room either side
    centre = t.detach().round()
    d = t - centre
    weights = torch.stack([0.5 * (0.5 - d) ** 2, 0.75 - d * d, 0.5 * (0.5 + d) ** 2], -2)
    index = (centre.long()[..., None, :] + torch.arange(-1, 2, device=x.device)[:, None]).clamp(0, bins - 1)
    return index, weights


def joint_histogram(a: torch.Tensor, b: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """(..., bins, bins) joint probability of two samples (..., N): each scaled by its own
    range (detached) and spread by a quadratic B-spline window (``_spline_bins``); nine
    entries a point. Differentiable in both samples."""
    batch, n = a.shape[:-1], a.shape[-1]
    a, b = a.reshape(-1, n), b.reshape(-1, n)
    ia, wa = _spline_bins(a, bins)
    ib, wb = _spline_bins(b, bins)
    index = ia[:, :, None, :] * bins + ib[:, None, :, :]  # (B, 3, 3, N)
    if a.shape[0] > 1:  # each sample of the batch fills its own histogram
        index = index + (torch.arange(a.shape[0], device=a.device) * bins * bins)[:, None, None, None]
    index = index.reshape(-1)
    size = a.shape[0] * bins * bins
    if b.requires_grad:  # both samples differentiable: autograd through the nine products
        weight = (wa[:, :, None, :] * wb[:, None, :, :]).reshape(-1)
        joint = torch.zeros(size, device=a.device, dtype=weight.dtype).index_add(0, index, weight)
    else:
        joint = _Histogram.apply(wa, wb, index, size)
    return joint.reshape(*batch, bins, bins) / n


class _Histogram(torch.autograd.Function):
    """The joint histograms' entries from the first samples' spline weights ``wa`` (B, 3, N),
    the second's ``wb`` (B, 3, N, constant) and the entries' flat bin ``index`` (B 9 N,).

    The same values as autograd through the nine products a point, and the gradient
    (linear in ``wa``: gathered from the histogram's gradient) in a few operations on
    (B, 9, N), not autograd's broadcasts and reductions. Its backward is differentiable
    (second derivatives hold).
    """

    @staticmethod
    def forward(ctx, wa, wb, index, size):
        ctx.save_for_backward(wb, index)
        weight = (wa[:, :, None, :] * wb[:, None, :, :]).reshape(-1)
        return torch.zeros(size, device=wa.device, dtype=weight.dtype).index_add_(0, index, weight)

    @staticmethod
    def backward(ctx, grad):
        wb, index = ctx.saved_tensors
        g = grad.index_select(0, index).reshape(wb.shape[0], 3, 3, -1)
        return (g * wb[:, None, :, :]).sum(2), None, None, None


def mi(warped: torch.Tensor, fixed: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """Negative mutual information (nats) of the two samples, from a Parzen-window joint histogram.

    Each sample is scaled by its own range (detached: the scaling is not part of what is
    optimized) and spread over ``bins`` bins by a quadratic B-spline window (as Mattes et
    al., IEEE TMI 2003, do with cubic ones in ANTs' and elastix' ``MattesMutualInformation``):
    nine joint-histogram entries a point, so the cost grows with the points, not with
    bins squared. Differentiable in both samples. Inputs (N,), or (..., N) a batch.
    """
    joint = joint_histogram(warped, fixed, bins)
    pa, pb = joint.sum(-1), joint.sum(-2)
    ratio = joint / (pa[..., :, None] * pb[..., None, :]).clamp(min=1e-12)
    return -(joint * torch.log(ratio.clamp(min=1e-12))).sum((-2, -1))


def normalized_mi(a: torch.Tensor, b: torch.Tensor, bins: int = MI_BINS) -> float:
    """Studholme's normalized mutual information (H(a) + H(b)) / H(a, b): 1 for independent
    samples, 2 for samples that determine each other; it does not grow with the overlap's
    entropy, so pairs of different images compare."""

    def entropy(p: torch.Tensor) -> float:
        p = p[p > 0]
        return float(-(p * torch.log(p)).sum())

    joint = joint_histogram(a.double(), b.double(), bins)
    return (entropy(joint.sum(1)) + entropy(joint.sum(0))) / max(entropy(joint.reshape(-1)), 1e-12)


def lncc_mi(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """``lncc`` over the windows (P, K) plus ``mi`` over all their points."""
    return lncc(warped, fixed) + mi(warped.flatten(-2), fixed.flatten(-2))
