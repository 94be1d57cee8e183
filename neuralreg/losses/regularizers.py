"""Regularizers of a pair of maps, evaluated at sampled points.

Each takes the maps ``phi_ab`` and ``phi_ba`` (callables (N, d) -> (N, d) in normalized
coordinates, see ``neuralreg.geometry.coordinates``) and points ``u`` (N, d) in the domain of ``phi_ba``.

GradICON here is ``mean_x ||grad(phi_ab o phi_ba)(x) - I||_F^2``. The convolutional
model of ``icon_registration.losses.GradientICON`` averages the same squared entries over
its d channels as well, so its value is this one divided by d.
"""

from __future__ import annotations

import torch

from neuralreg.metrics import det_of_columns


def _eye_rows(u: torch.Tensor):
    d = u.shape[1]
    return torch.eye(d, dtype=u.dtype, device=u.device)


def jacobian_autograd(y: torch.Tensor, u: torch.Tensor, create_graph: bool = True) -> torch.Tensor:
    """Spatial Jacobian dy/du (N, d_out, d_in) of pointwise y(u) by autograd (one pass per output)."""
    rows = [
        torch.autograd.grad(y[:, i].sum(), u, create_graph=create_graph, retain_graph=True)[0]
        for i in range(y.shape[1])
    ]
    return torch.stack(rows, 1)


def gradicon(phi_ab, phi_ba, u: torch.Tensor) -> torch.Tensor:
    """GradICON by autograd: mean ||J(phi_ab o phi_ba) - I||_F^2 (differentiable w.r.t. parameters)."""
    u = u.detach().requires_grad_(True)
    jac = jacobian_autograd(phi_ab(phi_ba(u)), u)
    return ((jac - _eye_rows(u)) ** 2).sum((1, 2)).mean()


def gradicon_analytic(phi_ab, phi_ba, u: torch.Tensor) -> torch.Tensor:
    """GradICON with each field's Jacobian pushed forward through its MLP (same value as ``gradicon``).

    ``phi_ab`` and ``phi_ba`` must provide ``forward_with_jacobian`` (``NeuralField`` does):
    J(phi_ab o phi_ba)(u) = J_ab(phi_ba(u)) J_ba(u), one forward and one backward pass.
    """
    y, jac_ba = phi_ba.forward_with_jacobian(u)
    _, jac_ab = phi_ab.forward_with_jacobian(y)
    return _product_penalty(jac_ab, jac_ba)


def gradicon_analytic_both_ways(
    phi_ab,
    phi_ba,
    u_moving: torch.Tensor,
    u_fixed: torch.Tensor,
    volume_weight: float = 0.0,
    values_at: tuple[torch.Tensor, torch.Tensor] | None = None,
):
    """0.5 (``gradicon_analytic(phi_ab, phi_ba, u_moving)`` + ``gradicon_analytic(phi_ba, phi_ab, u_fixed)``)
    in three Jacobian passes instead of four: ``phi_ab`` is evaluated once, at Phi_BA(u_moving)
    and at u_fixed together (one kernel launch, one table gradient, one node of the graph).
    ``volume_weight`` > 0 adds that weight times the mean of ``log_volume_penalty`` of
    Phi_AB at u_fixed and of Phi_BA at u_moving (each field on its own domain's points),
    from the same Jacobians.

    ``values_at``: points (v_ab (P, d), v_ba (Q, d)) where the maps' values are wanted as
    well (the similarity's), evaluated in the same passes without Jacobians (no pass of
    their own); then the return is (the term, (Phi_AB(v_ab), Phi_BA(v_ba))).
    """
    n, n_fixed = u_moving.shape[0], u_fixed.shape[0]
    v_ab, v_ba = values_at if values_at is not None else (None, None)
    inner = u_moving if v_ba is None else torch.cat([u_moving, v_ba])
    y_ba, jac_ba_moving = phi_ba.forward_with_jacobian(inner, n)
    y_moving, values_ba = y_ba.split([n, y_ba.shape[0] - n])  # one node each: its backward is one cat
    outer = [y_moving, u_fixed] + ([v_ab] if v_ab is not None else [])
    y_ab, jac_ab = phi_ab.forward_with_jacobian(torch.cat(outer), n + n_fixed)
    _, y_fixed, values_ab = y_ab.split([n, n_fixed, y_ab.shape[0] - n - n_fixed])
    _, jac_ba_fixed = phi_ba.forward_with_jacobian(y_fixed)
    jac_ab_moving, jac_ab_fixed = jac_ab.split([n, n_fixed])
    value = 0.5 * (_product_penalty(jac_ab_moving, jac_ba_moving) + _product_penalty(jac_ba_fixed, jac_ab_fixed))
    if volume_weight:
        value = value + volume_weight * 0.5 * (
            log_volume_penalty(phi_ab, jac_ab_fixed) + log_volume_penalty(phi_ba, jac_ba_moving)
        )
    if values_at is None:
        return value
    return value, (values_ab, values_ba)


def log_volume_penalty(phi, jac: torch.Tensor, floor: float = 1e-3) -> torch.Tensor:
    """mean_n (log det J_field)^2: the squared log of the local volume change that the map's
    field adds to its global affine part, from the full map's Jacobians ``jac`` (N, d, d)
    (J_full = J_field A, so det J_field = det J_full / det A). Zero where the field keeps
    volumes; a shrink by half costs as much as a growth to double. ``floor`` bounds the log
    where the field folds (det <= 0)."""
    det = det_of_columns(jac.unbind(-1))
    affine = getattr(phi, "affine", None)
    if affine is not None:
        det = det / det_of_columns(affine.rows(phi.inverse)[0].to(jac.dtype).unbind(-1))
    return torch.log(det.clamp_min(floor)).square().mean()


def _product_penalty(outer: torch.Tensor, inner: torch.Tensor) -> torch.Tensor:
    """mean_n ||outer_n inner_n - I||_F^2 of two stacks of Jacobians (N, d, d): the chain
    rule's product of the composition's two maps against the identity."""
    return _ProductPenalty.apply(outer, inner)


class _ProductPenalty(torch.autograd.Function):
    """``_product_penalty`` as one autograd node: with R = outer inner - I, the gradient is
    2 R inner^T / N for ``outer`` and 2 outer^T R / N for ``inner``. The same value as
    autograd's expression, op for op, the gradients to rounding (test); a graph of the
    gradient (second derivatives) is autograd's."""

    @staticmethod
    def forward(ctx, outer, inner):
        eye = torch.eye(outer.shape[1], dtype=outer.dtype, device=outer.device)
        residual = torch.baddbmm(eye, outer, inner, beta=-1)  # outer inner - I, one product
        ctx.save_for_backward(outer, inner, residual)
        return (residual**2).sum((1, 2)).mean()

    @staticmethod
    def backward(ctx, grad):
        outer, inner, residual = ctx.saved_tensors
        if torch.is_grad_enabled():
            with torch.enable_grad():
                value = ((torch.matmul(outer, inner) - _eye_rows(outer[:, 0])) ** 2).sum((1, 2)).mean()
                wanted = [t for t in (outer, inner) if t.requires_grad]
                got = iter(torch.autograd.grad(value, wanted, grad, create_graph=True))
                return tuple(next(got) if t.requires_grad else None for t in (outer, inner))
        g = residual * (2 * grad / residual.shape[0])
        return (
            torch.bmm(g, inner.transpose(1, 2)) if ctx.needs_input_grad[0] else None,
            torch.bmm(outer.transpose(1, 2), g) if ctx.needs_input_grad[1] else None,
        )


def gradicon_fd(phi_ab, phi_ba, u: torch.Tensor, step: float) -> torch.Tensor:
    """GradICON by forward finite differences with ``step`` (normalized units), as the convolutional model."""
    y0 = phi_ab(phi_ba(u))
    total = 0.0
    eye = _eye_rows(u)
    for i in range(u.shape[1]):
        col = (phi_ab(phi_ba(u + step * eye[i])) - y0) / step
        total = total + ((col - eye[i]) ** 2).sum(1)
    return total.mean()


def icon(phi_ab, phi_ba, u: torch.Tensor) -> torch.Tensor:
    """ICON: mean ||phi_ab(phi_ba(u)) - u||^2 (normalized units squared)."""
    return ((phi_ab(phi_ba(u)) - u) ** 2).sum(1).mean()


def diffusion(phi_ab, phi_ba, u: torch.Tensor) -> torch.Tensor:
    """Mean ||grad D||_F^2 of each field's displacement, summed over both fields."""
    total = 0.0
    for phi in (phi_ab, phi_ba):
        v = u.detach().requires_grad_(True)
        jac = jacobian_autograd(phi(v), v)
        total = total + ((jac - _eye_rows(v)) ** 2).sum((1, 2)).mean()
    return total


def bending(phi_ab, phi_ba, u: torch.Tensor) -> torch.Tensor:
    """Mean sum of squared second derivatives of each field (bending energy), both fields summed."""
    total = 0.0
    for phi in (phi_ab, phi_ba):
        v = u.detach().requires_grad_(True)
        jac = jacobian_autograd(phi(v), v)  # (N, d, d)
        d = v.shape[1]
        for i in range(d):
            for j in range(d):
                h = torch.autograd.grad(jac[:, i, j].sum(), v, create_graph=True, retain_graph=True)[0]
                total = total + (h**2).sum(1).mean()
    return total
