"""One autograd node per evaluation of a pair's map (global affine part, hash grid, ReLU MLP).

``map_pass(phi, u, n_jacobian)`` evaluates Phi(u) = psi(T(u)), psi(x) = x + D(x) and
D = MLP(enc(clamp(x, 0, 1))), as ``ComposedMap`` does op by op, with the Jacobian dPhi/du
at the first ``n_jacobian`` points, as a single ``torch.autograd.Function`` with its
backward written out. A step of the fields evaluates the maps three times (GradICON's
passes, the similarity's points riding in the first two: ``Stage.terms``); op by op, with
autograd's graph of the pieces (the affine part's product, the clamp and its mask, the
transposes of the encoding's Jacobian, the product with T's linear part), a step was 400
operations, and is 267 with these nodes: on a GPU each operation is a launch, and the step
is bound by the host, not the GPU (``benchmarks/step_ops.py``).

Coordinates: u (N, d) normalized points (``neuralreg.geometry.coordinates``); T(u) = u A^T + b
with (A^T, b) = ``AffineMap.rows``. The encoding's kernel clamps x = T(u) to the box and
gives the Jacobian's rows along u_j (the rows of A^T; zero along a clamped coordinate);
each layer pushes them forward in one GEMM over the m d rows, t' = 1[z > 0] (t W^T) (ReLU),
and the pass returns (dPhi/du)^T = A^T + (dD/du)^T, transposed by ``map_pass``. Only first
derivatives: the pass is ``once_differentiable`` (GradICON by autograd, which
differentiates twice, takes ``ComposedMap``'s own path).

It applies where the encoding runs on the native kernels, the activation is ReLU, the
affine part is frozen (no gradient to T) and the points and parameters share a dtype;
``applies`` says so, and the callers use the op-by-op path otherwise. Same values and
gradients as that path to rounding (tests/fields/test_fused.py).
"""

from __future__ import annotations

import torch
from torch.nn import functional

from neuralreg.fields import native

_threshold_backward = torch.ops.aten.threshold_backward  # ReLU's own backward: g where out > 0, else 0


def applies(phi, u: torch.Tensor) -> bool:
    """Whether ``map_pass`` can evaluate the ``ComposedMap`` ``phi`` at ``u`` (see the module)."""
    field, affine = phi.field, phi.affine
    if not torch.is_grad_enabled() or field.encoding.backend != "native" or field.config.activation != "relu":
        return False
    if affine.weight.requires_grad or affine.translation.requires_grad:
        return False
    dtype = field.encoding.table.dtype
    return u.dtype == dtype and all(p.dtype == dtype for p in field.mlp.parameters())


def map_pass(phi, u: torch.Tensor, n_jacobian: int):
    """Phi(u) (N, d) and its Jacobian at the first ``n_jacobian`` points (n_jacobian, d, d)
    (a transposed view; None where ``n_jacobian`` is 0), in one autograd node; ``phi`` a
    ``ComposedMap`` for which ``applies`` holds."""
    field, encoding = phi.field, phi.field.encoding
    linear_t, offset = phi.affine.rows(phi.inverse)
    layout = encoding.layout.first(encoding.n_active)
    out = _MapPass.apply(
        u,
        linear_t.to(u.dtype),
        offset.to(u.dtype),
        n_jacobian,
        layout,
        encoding.config.interpolation == "Smoothstep",
        encoding.table,
        *field._mlp_parameters(),
    )
    if not n_jacobian:
        return out, None
    phi_u, jac_t = out
    return phi_u, jac_t.transpose(1, 2)


class _MapPass(torch.autograd.Function):
    """(u, A^T, b, n_jacobian, layout, smooth, table, W_1, b_1, ..., W_k, b_k) ->
    Phi(u) (N, d), and where ``n_jacobian`` > 0 (dPhi/du)^T at the first n_jacobian points.

    The points after the first ``n_jacobian`` take the encoding's value kernel alone (the
    similarity's points, evaluated in the pass of GradICON's). ``layout``: the active
    levels' layout (``LevelLayout.first``); the table's rows after them and the features
    they would give are zero in the op-by-op path, so the first layer reads zero padding
    there and the table's gradient is zero there.
    """

    @staticmethod
    def forward(ctx, u, linear_t, offset, n_jacobian, layout, smooth, table, *params):
        layout_args = native._layout_args(layout)
        n, d = u.shape
        m = n_jacobian
        x = torch.addmm(offset, u, linear_t)
        rows = layout.n_params_rows
        tab = table if rows == table.shape[0] else table[:rows]
        width = params[0].shape[1]  # the first layer's inputs: L F, the switched-off levels' zero padding included
        # the kernel clamps x to the box and gives the encoding's rows along u_j (rows of A^T)
        # for the first m points: (m, d, F), zero along a clamped coordinate
        feats, t = native._mod(u).hashgrid_forward_jacobian(x, tab, linear_t, m, *layout_args, smooth)
        t = _pad(t, width).view(m * d, width) if m else None
        h = _pad(feats, width)
        saved = []  # per hidden layer: its input h, t and its output (ReLU's mask)
        for k in range(0, len(params) - 2, 2):
            w_t = params[k].t()
            h_next = torch.relu(torch.addmm(params[k + 1], h, w_t))
            t_next = None
            if t is not None:
                mask = _head(h_next, m, n).unsqueeze(1)
                t_next = _threshold_backward((t @ w_t).view(m, d, -1), mask, 0).view(m * d, -1)
            saved += [h, t, h_next]
            h, t = h_next, t_next
        w_t = params[-2].t()
        phi_u = x + torch.addmm(params[-1], h, w_t)
        tensors = [x, tab, linear_t, h, *saved, *params]
        if m:
            tensors.append(t)
            jac_t = (t @ w_t).view(m, d, d) + linear_t  # (dPhi/du)^T: A^T + (dD/du)^T
        ctx.save_for_backward(*[s if s is not None else torch.empty(0) for s in tensors])
        ctx.n_jacobian, ctx.layout_args, ctx.smooth = m, layout_args, smooth
        ctx.n_layers, ctx.full_rows, ctx.active_width = len(params) // 2, table.shape[0], feats.shape[1]
        ctx.set_materialize_grads(False)  # an output not used (GradICON's outer value): None
        return (phi_u, jac_t) if m else phi_u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_phi, g_jac_t=None):
        tensors = ctx.saved_tensors
        layers, m = ctx.n_layers, ctx.n_jacobian
        x, tab, linear_t, h = tensors[:4]
        saved = tensors[4 : 4 + 3 * (layers - 1)]
        params = tensors[4 + 3 * (layers - 1) : 4 + 3 * (layers - 1) + 2 * layers]
        n, d = x.shape
        if not m:
            g_jac_t = None
        grads = [None] * (2 * layers)
        w = params[-2]
        gh = gt = None
        if g_phi is not None:
            grads[-2], grads[-1] = g_phi.t() @ h, g_phi.sum(0)
            gh = g_phi @ w
        else:
            grads[-1] = torch.zeros_like(params[-1])
        if g_jac_t is not None:
            gt, t = g_jac_t.reshape(m * d, d), tensors[-1]
            grads[-2] = gt.t() @ t if grads[-2] is None else torch.addmm(grads[-2], gt.t(), t)
            gt = gt @ w
        for k in range(layers - 2, -1, -1):
            h_in, t_in, out = saved[3 * k : 3 * k + 3]
            gz = None if gh is None else _threshold_backward(gh, out, 0)
            gu = None
            if gt is not None:
                gu = _threshold_backward(gt.view(m, d, -1), _head(out, m, n).unsqueeze(1), 0).view(m * d, -1)
            gw = None if gz is None else gz.t() @ h_in
            if gu is not None:
                gw = gu.t() @ t_in if gw is None else torch.addmm(gw, gu.t(), t_in)
            grads[2 * k] = gw if gw is not None else torch.zeros_like(params[2 * k])
            grads[2 * k + 1] = gz.sum(0) if gz is not None else torch.zeros_like(params[2 * k + 1])
            w = params[2 * k]
            gh = None if gz is None else gz @ w
            gt = None if gu is None else gu @ w
        need_u, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[6]
        g_x = g_table = None
        if need_u or need_table:
            active = ctx.active_width
            g_feats = x.new_zeros(n, active) if gh is None else gh[:, :active]
            n_rows, g_rows = (0, x.new_empty(0)) if gt is None else (m, gt.view(m, d, -1)[:, :, :active])
            g_x, g_table = native._mod(x).hashgrid_jacobian_backward(
                g_feats, g_rows, x, tab, linear_t, n_rows, *ctx.layout_args, ctx.smooth, need_u, need_table
            )
        g_u = None
        if need_u:
            if g_phi is not None:  # Phi = x + D(clamp(x)): the kernel's gradient (zero where clamped) and g_phi
                g_x = g_x + g_phi
            g_u = g_x @ linear_t.t()
        if need_table and g_table is not None and g_table.shape[0] < ctx.full_rows:
            g_table = functional.pad(g_table, (0, 0, 0, ctx.full_rows - g_table.shape[0]))
        return g_u, None, None, None, None, None, (g_table if need_table else None), *grads


def _head(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The first ``m`` of ``n`` rows of ``t`` (``t`` itself where m == n: no view to record)."""
    return t if m == n else t[:m]


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (..., w) with zeros after its last axis up to ``width``."""
    return t if t.shape[-1] == width else functional.pad(t, (0, width - t.shape[-1]))
