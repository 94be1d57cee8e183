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


def _ncc_parts(a: torch.Tensor, b: torch.Tensor, dim: int) -> tuple[torch.Tensor, ...]:
    """(a, b centred along ``dim``, their covariance c, b's variance v_b, s =
    sqrt(var(a) v_b + eps^2)): NCC is c / s."""
    a = a - a.mean(dim, keepdim=True)
    b = b - b.mean(dim, keepdim=True)
    cov = (a * b).mean(dim)
    vb = (b * b).mean(dim)
    return a, b, cov, vb, torch.sqrt((a * a).mean(dim) * vb + _EPS**2)


def _ncc(a: torch.Tensor, b: torch.Tensor, dim: int) -> torch.Tensor:
    _, _, cov, _, s = _ncc_parts(a, b, dim)
    return cov / s


def ncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """1 - global normalized cross-correlation over the points (the last axis)."""
    return 1.0 - _ncc(warped, fixed, -1)


def lncc(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """1 - mean local NCC over windows: inputs (P, K), or (..., P, K) a batch. Where
    ``fixed`` is constant (as in a registration) one autograd node (``_LocalNCC``)."""
    if fixed.requires_grad:
        return 1.0 - _ncc(warped, fixed, -1).mean(-1)
    return _LocalNCC.apply(warped, fixed)


class _LocalNCC(torch.autograd.Function):
    """``lncc(warped, fixed)`` for a constant ``fixed``, with its gradient written out.

    With a, b the windows' centred samples (K points), c = mean(a b), v_b = mean(b^2) and
    s = sqrt(mean(a^2) v_b + eps^2), a window's NCC is c / s and its gradient in the warped
    values (b / s - c v_b a / s^3) / K; the loss averages the P windows. The same value as
    ``_ncc``, op for op, and the gradient to rounding (test), in a handful of operations
    instead of autograd's graph of means, broadcasts and subtractions (a field step
    evaluates two such terms).
    """

    @staticmethod
    def forward(ctx, warped, fixed):
        a, b, cov, vb, s = _ncc_parts(warped, fixed, -1)
        ctx.save_for_backward(a, b, cov, vb, s, warped, fixed)
        return 1.0 - (cov / s).mean(-1)

    @staticmethod
    def backward(ctx, grad):
        a, b, cov, vb, s, warped, fixed = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the gradient (second derivatives): autograd's
            with torch.enable_grad():
                value = 1.0 - _ncc(warped, fixed, -1).mean(-1)
                return torch.autograd.grad(value, warped, grad, create_graph=True)[0], None
        per_window = (grad[..., None] / -(a.shape[-1] * a.shape[-2])) / s  # (..., P): d loss / d (c / s) / K
        g = b - (cov * vb / (s * s))[..., None] * a
        return g * per_window[..., None], None


MI_BINS = 32
WINDOWED = ("lncc", "lncc_mi")  # the similarities that take windows of points (P, K)


def _spline_bins(x: torch.Tensor, bins: int, counted: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Quadratic B-spline Parzen window: each value of ``x`` (..., N) spread over its three
    nearest of ``bins`` bins spanning its sample's own range (of the points where
    ``counted``, a bool (..., N), is set, where given). Returns (bin indices (..., 3, N),
    weights (..., 3, N), summing to 1 over the three, differentiable in ``x``); the points
    run along the last axis, so that products and sums over the three run on contiguous rows."""
    v = x.detach()
    if counted is None:
        lo, hi = v.amin(-1, keepdim=True), v.amax(-1, keepdim=True)
    else:
        lo = torch.where(counted, v, torch.inf).amin(-1, keepdim=True).clamp(max=v.amax(-1, keepdim=True))
        hi = torch.where(counted, v, -torch.inf).amax(-1, keepdim=True).clamp(min=lo)
    t = (x - lo) / (hi - lo).clamp(min=_EPS) * (bins - 3) + 1  # centres 1 .. bins-2: room either side
    centre = t.detach().round()
    d = t - centre
    weights = torch.stack([0.5 * (0.5 - d) ** 2, 0.75 - d * d, 0.5 * (0.5 + d) ** 2], -2)
    index = (centre.long()[..., None, :] + torch.arange(-1, 2, device=x.device)[:, None]).clamp(0, bins - 1)
    return index, weights


def joint_histogram(a: torch.Tensor, b: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """(..., bins, bins) joint probability of two samples (..., N): each scaled by its own
    range (detached) and spread by a quadratic B-spline window (``_spline_bins``); nine
    entries a point. Differentiable in both samples (autograd through the nine products)."""
    batch, n = a.shape[:-1], a.shape[-1]
    ia, wa = _spline_bins(a.reshape(-1, n), bins)
    ib, wb = _spline_bins(b.reshape(-1, n), bins)
    weight = (wa[:, :, None, :] * wb[:, None, :, :]).reshape(-1)
    joint = torch.zeros(ia.shape[0] * bins * bins, device=a.device, dtype=weight.dtype)
    return joint.index_add(0, _joint_index(ia, ib, bins), weight).reshape(*batch, bins, bins) / n


def _joint_index(ia: torch.Tensor, ib: torch.Tensor, bins: int) -> torch.Tensor:
    """Flat joint-histogram entries (B 9 N,) of the bin indices (B, 3, N) of two batches of
    samples, each sample of the batch its own (bins, bins) histogram."""
    index = ia[:, :, None, :] * bins + ib[:, None, :, :]  # (B, 3, 3, N)
    if ia.shape[0] > 1:
        index = index + (torch.arange(ia.shape[0], device=ia.device) * bins * bins)[:, None, None, None]
    return index.reshape(-1)


def _information(joint: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Negative mutual information of joint probabilities (..., bins, bins), and the log of
    each entry over the product of its marginals (floored at 1e-12)."""
    pa, pb = joint.sum(-1), joint.sum(-2)
    ratio = joint / (pa[..., :, None] * pb[..., None, :]).clamp(min=1e-12)
    log_ratio = torch.log(ratio.clamp(min=1e-12))
    return -(joint * log_ratio).sum((-2, -1)), log_ratio


def mi(warped: torch.Tensor, fixed: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """Negative mutual information (nats) of the two samples, from a Parzen-window joint histogram.

    Each sample is scaled by its own range (detached: the scaling is not part of what is
    optimized) and spread over ``bins`` bins by a quadratic B-spline window (as Mattes et
    al., IEEE TMI 2003, do with cubic ones in ANTs' and elastix' ``MattesMutualInformation``):
    nine joint-histogram entries a point, so the cost grows with the points, not with
    bins squared. Inputs (N,), or (..., N) a batch. Differentiable in both samples (to second
    order); where ``fixed`` is constant (as in a registration) one autograd node
    (``_MutualInformation``).
    """
    if fixed.requires_grad:
        return _information(joint_histogram(warped, fixed, bins))[0]
    return _MutualInformation.apply(warped, fixed, bins)


class _MutualInformation(torch.autograd.Function):
    """``mi(warped, fixed)`` for a constant ``fixed``, with its gradient written out.

    The gradient of -MI with respect to a joint entry is 1 - log(p_ij / (p_i p_j)); a point
    gathers it from its nine entries, weighted by the fixed value's window, times the
    derivative of its own window (d = the offset from its bin's centre: weights
    0.5 (0.5 - d)^2, 0.75 - d^2, 0.5 (0.5 + d)^2) and of its scaling. The same value as
    autograd through the histogram and the gradient to rounding (test), in a few operations
    on (B, 9, N) instead of autograd's graph of broadcasts and reductions; where the native
    kernels are loaded for the sample's device, one kernel call each way (``mi_forward``,
    ``mi_backward``: ``cuda_kernels/mi.cu`` and its CPU twin, the same math; test).
    """

    @staticmethod
    def forward(ctx, warped, fixed, bins):
        batch, n = warped.shape[:-1], warped.shape[-1]
        ctx.shape, ctx.n, ctx.bins = warped.shape, n, bins
        module = _native_kernels(warped)
        ctx.native = module is not None
        if module is not None:  # ranges, histogram, entropies: one call (the kernels' mi_forward)
            value, log_ratio, scale = module.mi_forward(warped.reshape(-1, n), fixed.reshape(-1, n), bins, _EPS)
            ctx.save_for_backward(log_ratio, scale, warped, fixed)
            return value.reshape(batch)
        both = torch.stack([warped.reshape(-1, n), fixed.reshape(-1, n)])  # (2, B, N)
        index, weights = _spline_bins(both, bins)  # (2, B, 3, N)
        wa, wb = weights[0], weights[1]
        weight = (wa[:, :, None, :] * wb[:, None, :, :]).reshape(-1)
        entries = _joint_index(index[0], index[1], bins)
        joint = torch.zeros(index.shape[1] * bins * bins, device=warped.device, dtype=weight.dtype)
        joint = joint.index_add_(0, entries, weight).reshape(-1, bins, bins) / n
        value, log_ratio = _information(joint)
        lo, hi = both[0].amin(-1, keepdim=True), both[0].amax(-1, keepdim=True)
        slope = (bins - 3) / (hi - lo).clamp(min=_EPS)  # dt/dx of the warped sample's scaling
        ctx.save_for_backward(wa, wb, entries, log_ratio, slope, warped, fixed)
        return value.reshape(batch)

    @staticmethod
    def backward(ctx, grad):
        warped, fixed = ctx.saved_tensors[-2:]
        if ctx.native and not torch.is_grad_enabled():
            log_ratio, scale = ctx.saved_tensors[:2]
            n = ctx.n
            g = _native_kernels(warped).mi_backward(
                grad.reshape(-1), warped.reshape(-1, n), fixed.reshape(-1, n), scale, log_ratio, ctx.bins
            )
            return g.reshape(ctx.shape), None, None
        if torch.is_grad_enabled():  # a graph of the gradient (second derivatives): autograd's
            with torch.enable_grad():
                value = _information(joint_histogram(warped, fixed, ctx.bins))[0]
                return torch.autograd.grad(value, warped, grad, create_graph=True)[0], None, None
        wa, wb, entries, log_ratio, slope = ctx.saved_tensors[:5]
        b = wa.shape[0]
        g_joint = (1 - log_ratio) * (grad.reshape(b, 1, 1) / ctx.n)
        g = g_joint.reshape(-1).index_select(0, entries).reshape(b, 3, 3, -1)
        g_w = (g * wb[:, None, :, :]).sum(2)  # (B, 3, N): d(-MI)/d(the warped value's weights)
        d = wa[:, 2] - wa[:, 0]  # the offset from the bin's centre
        g_d = d * (g_w[:, 0] - 2 * g_w[:, 1] + g_w[:, 2]) + 0.5 * (g_w[:, 2] - g_w[:, 0])
        return (g_d * slope).reshape(ctx.shape), None, None


def _native_kernels(x: torch.Tensor):
    """The native kernels' module for ``x``'s device where they are loaded (``fields.native``:
    the CPU twin, CUDA, or the emulated CUDA kernels in tests) and ``x`` is float32/64; else None."""
    from neuralreg.fields import native

    if x.dtype not in (torch.float32, torch.float64) or not native.hashgrid_available(x.device):
        return None
    return native._mod(x)


def overlap_mi(warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor, bins: int = MI_BINS) -> torch.Tensor:
    """Negative mutual information of the points inside both images' fields of view, times
    their share: -f MI(q), q the joint histogram of the points weighted by ``weight`` in
    [0, 1] (1: the point and its warped position both hold data) normalized to sum to 1, f
    the mean weight.

    A scan's zero padding (where its field of view ends inside its grid) and what lies
    outside its grid are not tissue: counted as intensities (``mi``), they form a class of
    their own that a global fit can align with something in the other image, scaling
    the anatomy away (docs/benchmarks.md). Counting only the overlap, as ITK's and elastix'
    metrics drop samples outside the moving image, removes that class; the share f keeps
    the fit from shrinking the overlap to the few points that match best (the mutual
    information of a small overlap is high). ``weight`` is differentiable (a mask sampled
    by linear interpolation at the warped points): the overlap's edge moves with the map.

    Inputs (..., N), ``weight`` broadcast to ``warped``; returns (...). With ``weight`` all
    ones, equal to ``mi``.
    """
    batch, n = warped.shape[:-1], warped.shape[-1]
    weight = weight.expand_as(warped).reshape(-1, n)
    fixed = fixed.expand_as(warped).reshape(-1, n)
    if not fixed.requires_grad and _native_kernels(warped) is not None and warped.dtype == weight.dtype:
        return _OverlapMI.apply(warped.reshape(-1, n), fixed, weight, bins).reshape(batch)
    return _overlap_mi(warped.reshape(-1, n), fixed, weight, bins).reshape(batch)


def _overlap_mi(warped: torch.Tensor, fixed: torch.Tensor, weight: torch.Tensor, bins: int) -> torch.Tensor:
    """``overlap_mi`` of (B, N) samples and weights, op by op (autograd differentiates it, to second order)."""
    n = warped.shape[-1]
    counted = weight.detach() > 0  # the histograms span the counted points' range
    ia, wa = _spline_bins(warped, bins, counted)
    ib, wb = _spline_bins(fixed, bins, counted)
    entry = (wa[:, :, None, :] * wb[:, None, :, :] * weight[:, None, None, :]).reshape(-1)
    joint = torch.zeros(ia.shape[0] * bins * bins, device=warped.device, dtype=entry.dtype)
    joint = joint.index_add(0, _joint_index(ia, ib, bins), entry).reshape(-1, bins, bins) / n
    share = joint.sum((-2, -1))
    return share * _information(joint / share.clamp(min=_EPS)[:, None, None])[0]


class _OverlapMI(torch.autograd.Function):
    """``overlap_mi`` of (B, N) samples, a constant fixed one, on the native kernels: one call
    each way (``overlap_mi_forward``, ``overlap_mi_backward``: ``cuda_kernels/mi.cu`` and its
    CPU twin) instead of a few dozen operations on (B, 9, N) and their graph.

    With s the overlap's share and q the normalized joint histogram, value = s I(q) and its
    derivative with respect to a joint entry is -log(q_ij / (q_i q_j)) (where s > eps: the
    share's own derivative cancels the normalization's); a point gathers it from its nine
    entries, times its weight and the derivative of its window for the warped value, times
    its window products for the weight. The same values and gradients as ``_overlap_mi`` to
    rounding, the floors of its logarithms included (tests). A gradient of the gradient
    goes through ``_overlap_mi`` (autograd's)."""

    @staticmethod
    def forward(ctx, warped, fixed, weight, bins):
        module = _native_kernels(warped)
        value, entry_grad, scale = module.overlap_mi_forward(warped, fixed, weight, bins, _EPS)
        ctx.save_for_backward(warped, fixed, weight, scale, entry_grad)
        ctx.bins = bins
        return value

    @staticmethod
    def backward(ctx, grad):
        warped, fixed, weight, scale, entry_grad = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the gradient (second derivatives): autograd's
            with torch.enable_grad():
                need = [t for t, k in ((warped, 0), (weight, 2)) if ctx.needs_input_grad[k]]
                grads = iter(
                    torch.autograd.grad(_overlap_mi(warped, fixed, weight, ctx.bins), need, grad, create_graph=True)
                )
                return tuple(next(grads) if k in (0, 2) and ctx.needs_input_grad[k] else None for k in range(4))
        g_w, g_m = _native_kernels(warped).overlap_mi_backward(
            grad.contiguous(), warped, fixed, weight, scale, entry_grad, ctx.bins
        )
        return g_w, None, g_m, None


def normalized_mi(a: torch.Tensor, b: torch.Tensor, bins: int = MI_BINS) -> float:
    """Studholme's normalized mutual information (H(a) + H(b)) / H(a, b): 1 for independent
    samples, 2 for samples that determine each other; it does not grow with the overlap's
    entropy, so pairs of different images compare."""
    return float(normalized_mi_of_joint(joint_histogram(a.double(), b.double(), bins), (0, 1), floor=1e-12))


def normalized_mi_of_joint(joint: torch.Tensor, dims: tuple = (0, 1), floor: float = 1e-6) -> torch.Tensor:
    """(H(A) + H(B)) / H(A, B) of joint probabilities whose bin axes are ``dims`` (two
    non-negative axes, A's first); every other axis is a batch (the global search's shifts).
    ``floor`` bounds the joint entropy from below."""
    a, b = dims

    def entropy(p: torch.Tensor, axes) -> torch.Tensor:
        return -(p * torch.log(p.clamp(min=1e-12))).sum(axes)

    return (entropy(joint.sum(b), a) + entropy(joint.sum(a), b - 1)) / entropy(joint, (a, b)).clamp(min=floor)


def lncc_mi(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """``lncc`` over the windows (P, K) plus ``mi`` over all their points."""
    return lncc(warped, fixed) + mi(warped.flatten(-2), fixed.flatten(-2))
