"""One autograd node per evaluation of a pair's map (global affine part, hash grid, ReLU MLP).

``map_pass(phi, u, jacobian)`` evaluates Phi(u) = psi(T(u)), psi(x) = x + D(x) and
D = MLP(enc(clamp(x, 0, 1))), as ``ComposedMap`` does op by op, but as a single
``torch.autograd.Function`` with its backward written out. Where the fields are fitted a step
evaluates the maps five times (the similarity's two, GradICON's three); each evaluation
was about 80 operations with autograd's graph of its pieces (the affine part's product,
the clamp and its mask, the transposes of the encoding's Jacobian, the product with T's
linear part) and is about 45 here: on a GPU each operation is a launch and the step is
bound by the host, not the GPU (``benchmarks/step_ops.py``).

Coordinates: u (N, d) normalized points (``neuralreg.geometry.coordinates``); T(u) = u A^T + b
with (A^T, b) = ``AffineMap.rows``. The Jacobian pass gives dPhi/du as its transpose: rows
j = 0..d-1 are the derivatives along u_j, one GEMM over N d rows a layer, each pushed
forward as t' = 1[z > 0] (t W^T) (ReLU). Only first derivatives: the pass is
``once_differentiable`` (GradICON by autograd, which differentiates twice, takes
``ComposedMap``'s own path).

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
        module = native._mod(u)
        layout_args = native._layout_args(layout)
        n, d = u.shape
        m = n_jacobian
        x = torch.addmm(offset, u, linear_t)
        xc = x.clamp(0.0, 1.0)
        inside = x == xc  # the clamp's derivative (x in [0, 1]; NaN: 0)
        rows = layout.n_params_rows
        tab = table if rows == table.shape[0] else table[:rows]
        width = params[0].shape[1]  # the first layer's inputs: L F, the switched-off levels' zero padding included
        t = None
        if m == 0:
            feats = module.hashgrid_forward(xc, tab, *layout_args, smooth)
        elif m == n:
            feats, jac = module.hashgrid_forward_jacobian(xc, tab, *layout_args, smooth)
        else:
            feats, jac = module.hashgrid_forward_jacobian(xc[:m], tab, *layout_args, smooth)
            feats = torch.cat([feats, module.hashgrid_forward(xc[m:], tab, *layout_args, smooth)])
        if m:
            # d enc / d u_j = sum_k d enc / d xc_k inside_k (A^T)_jk: rows (m, d, F), one product
            t = torch.bmm(linear_t.unsqueeze(0) * _head(inside, m, n).unsqueeze(1), jac.transpose(1, 2))
            t = _pad(t, width).view(m * d, width)
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
        tensors = [xc, inside, tab, linear_t, h, *saved, *params]
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
        xc, inside, tab, linear_t, h = tensors[:5]
        saved = tensors[5 : 5 + 3 * (layers - 1)]
        params = tensors[5 + 3 * (layers - 1) : 5 + 3 * (layers - 1) + 2 * layers]
        n, d = xc.shape
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
            g_x, g_table = _encoding_backward(ctx, gh, gt, xc, inside, tab, linear_t, need_u, need_table)
        g_u = None
        if need_u:
            g_x = g_x * inside if g_x is not None else None
            if g_phi is not None:
                g_x = g_phi if g_x is None else g_x + g_phi
            if g_x is not None:
                g_u = g_x @ linear_t.t()
        if need_table and g_table is not None and g_table.shape[0] < ctx.full_rows:
            g_table = functional.pad(g_table, (0, 0, 0, ctx.full_rows - g_table.shape[0]))
        return g_u, None, None, None, None, None, (g_table if need_table else None), *grads


def _encoding_backward(ctx, gh, gt, xc, inside, tab, linear_t, need_x: bool, need_table: bool):
    """(d loss / d xc (N, d) or None, d loss / d table) from the gradients of the first layer's
    inputs: gh (N, width) of the features, gt (m d, width) of the Jacobian's rows (None:
    not used)."""
    module, args = native._mod(xc), (*ctx.layout_args, ctx.smooth)
    n, d = xc.shape
    m, active = ctx.n_jacobian, ctx.active_width
    if gh is None:
        gh = xc.new_zeros(n, active)
    g_feats = gh[:, :active].contiguous() if gh.shape[1] > active else gh
    if gt is None:  # the Jacobian not used: the value kernel's backward for every point
        g_x, g_table = module.hashgrid_backward(g_feats, xc, tab, *args, need_x, need_table)
        return (g_x if need_x else None), g_table
    # t = Q jac^T with Q = (A^T)[None] * inside[:, None, :]: d t / d jac^T = Q^T
    q = linear_t.unsqueeze(0) * _head(inside, m, n).unsqueeze(1)
    g_jac = torch.bmm(q.transpose(1, 2), gt.view(m, d, -1)[:, :, :active]).transpose(1, 2).contiguous()
    if m == n:
        g_x, g_table = module.hashgrid_jacobian_backward(g_feats, g_jac, xc, tab, *args, need_x, need_table)
        return (g_x if need_x else None), g_table
    g_xj, g_tj = module.hashgrid_jacobian_backward(g_feats[:m], g_jac, xc[:m], tab, *args, need_x, need_table)
    g_xv, g_tv = module.hashgrid_backward(g_feats[m:], xc[m:], tab, *args, need_x, need_table)
    g_x = torch.cat([g_xj, g_xv]) if need_x else None
    return g_x, (g_tj + g_tv if need_table else None)


def _head(t: torch.Tensor, m: int, n: int) -> torch.Tensor:
    """The first ``m`` of ``n`` rows of ``t`` (``t`` itself where m == n: no view to record)."""
    return t if m == n else t[:m]


def _pad(t: torch.Tensor, width: int) -> torch.Tensor:
    """``t`` (..., w) with zeros after its last axis up to ``width``."""
    return t if t.shape[-1] == width else functional.pad(t, (0, width - t.shape[-1]))
