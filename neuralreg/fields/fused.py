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


def map_pass(phi, u: torch.Tensor, jacobian: bool):
    """Phi(u) (N, d), and with ``jacobian`` its Jacobian (N, d, d) (a transposed view), in
    one autograd node; ``phi`` a ``ComposedMap`` for which ``applies`` holds."""
    field, encoding = phi.field, phi.field.encoding
    linear_t, offset = phi.affine.rows(phi.inverse)
    layout = encoding.layout.first(encoding.n_active)
    params = field._mlp_parameters()
    out = _MapPass.apply(
        u,
        linear_t.to(u.dtype),
        offset.to(u.dtype),
        jacobian,
        layout,
        encoding.config.interpolation == "Smoothstep",
        encoding.table,
        *params,
    )
    if not jacobian:
        return out
    phi_u, jac_t = out
    return phi_u, jac_t.transpose(1, 2)


class _MapPass(torch.autograd.Function):
    """(u, A^T, b, jacobian, layout, smooth, table, W_1, b_1, ..., W_k, b_k) ->
    Phi(u) (N, d), and with ``jacobian`` (dPhi/du)^T (N, d, d).

    ``layout``: the active levels' layout (``LevelLayout.first``); the table's rows after
    them and the features they would give are zero in the op-by-op path, so the first
    layer reads zero padding there and the table's gradient is zero there.
    """

    @staticmethod
    def forward(ctx, u, linear_t, offset, jacobian, layout, smooth, table, *params):
        module = native._mod(u)
        layout_args = native._layout_args(layout)
        n, d = u.shape
        x = torch.addmm(offset, u, linear_t)
        xc = x.clamp(0.0, 1.0)
        inside = (x == xc).to(x.dtype)  # the clamp's derivative (x in [0, 1]; NaN: 0)
        rows = layout.n_params_rows
        tab = table if rows == table.shape[0] else table[:rows]
        width = params[0].shape[1]  # the first layer's inputs: L F, the switched-off levels' zero padding included
        t = None
        if jacobian:
            feats, jac = module.hashgrid_forward_jacobian(xc, tab, *layout_args, smooth)
            # d enc / d u_j = sum_k d enc / d xc_k inside_k (A^T)_jk: rows (N, d, F), one product
            t = torch.bmm(linear_t.unsqueeze(0) * inside.unsqueeze(1), jac.transpose(1, 2))
            t = (
                functional.pad(t, (0, width - t.shape[2])).view(n * d, width)
                if t.shape[2] < width
                else t.view(n * d, -1)
            )
        else:
            feats = module.hashgrid_forward(xc, tab, *layout_args, smooth)
        h = functional.pad(feats, (0, width - feats.shape[1])) if feats.shape[1] < width else feats
        saved = []  # per hidden layer: its input h, t and its output (ReLU's mask)
        for k in range(0, len(params) - 2, 2):
            w_t = params[k].t()
            h_next = torch.relu(torch.addmm(params[k + 1], h, w_t))
            if t is not None:
                t_next = _threshold_backward((t @ w_t).view(n, d, -1), h_next.unsqueeze(1), 0).view(n * d, -1)
            else:
                t_next = None
            saved += [h, t, h_next]
            h, t = h_next, t_next
        w_t = params[-2].t()
        phi_u = x + torch.addmm(params[-1], h, w_t)
        tensors = [xc, inside, tab, linear_t, h, *saved, *params]
        if jacobian:
            tensors.append(t)
            jac_t = (t @ w_t).view(n, d, d) + linear_t  # (dPhi/du)^T: A^T + (dD/du)^T
        ctx.save_for_backward(*[s if s is not None else torch.empty(0) for s in tensors])
        ctx.jacobian, ctx.layout_args, ctx.smooth = jacobian, layout_args, smooth
        ctx.n_layers, ctx.full_rows, ctx.active_width = len(params) // 2, table.shape[0], feats.shape[1]
        ctx.set_materialize_grads(False)  # an output not used (GradICON's outer value): None
        return (phi_u, jac_t) if jacobian else phi_u

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, g_phi, g_jac_t=None):
        tensors = ctx.saved_tensors
        layers, jacobian = ctx.n_layers, ctx.jacobian
        xc, inside, tab, linear_t, h = tensors[:5]
        saved = tensors[5 : 5 + 3 * (layers - 1)]
        params = tensors[5 + 3 * (layers - 1) : 5 + 3 * (layers - 1) + 2 * layers]
        n, d = xc.shape
        if not jacobian:
            g_jac_t = None
        else:
            t = tensors[-1]
        grads = [None] * (2 * layers)
        w = params[-2]
        gh = gt = None
        if g_phi is not None:
            grads[-2], grads[-1] = g_phi.t() @ h, g_phi.sum(0)
            gh = g_phi @ w
        else:
            grads[-1] = torch.zeros_like(params[-1])
        if g_jac_t is not None:
            gt = g_jac_t.reshape(n * d, d)
            grads[-2] = gt.t() @ t if grads[-2] is None else torch.addmm(grads[-2], gt.t(), t)
            gt = gt @ w
        for k in range(layers - 2, -1, -1):
            h_in, t_in, out = saved[3 * k : 3 * k + 3]
            gz = None if gh is None else _threshold_backward(gh, out, 0)
            gu = None if gt is None else _threshold_backward(gt.view(n, d, -1), out.unsqueeze(1), 0).view(n * d, -1)
            gw = None if gz is None else gz.t() @ h_in
            if gu is not None:
                gw = gu.t() @ t_in if gw is None else torch.addmm(gw, gu.t(), t_in)
            grads[2 * k] = gw if gw is not None else torch.zeros_like(params[2 * k])
            grads[2 * k + 1] = gz.sum(0) if gz is not None else torch.zeros_like(params[2 * k + 1])
            w = params[2 * k]
            gh = None if gz is None else gz @ w
            gt = None if gu is None else gu @ w
        active = ctx.active_width
        need_u, need_table = ctx.needs_input_grad[0], ctx.needs_input_grad[6]
        g_x = g_table = None
        if need_u or need_table:
            if gh is None:
                gh = xc.new_zeros(n, params[0].shape[1])
            g_feats = gh[:, :active].contiguous() if gh.shape[1] > active else gh
            module = native._mod(xc)
            if jacobian and gt is not None:
                g_t = gt.view(n, d, -1)[:, :, :active]
                # t = Q jac^T with Q = (A^T)[None] * inside[:, None, :]: d t / d jac^T = Q^T
                q = linear_t.unsqueeze(0) * inside.unsqueeze(1)
                g_jac = torch.bmm(q.transpose(1, 2), g_t).transpose(1, 2).contiguous()
                g_x, g_table = module.hashgrid_jacobian_backward(
                    g_feats, g_jac, xc, tab, *ctx.layout_args, ctx.smooth, need_u, need_table
                )
            else:
                g_x, g_table = module.hashgrid_backward(
                    g_feats, xc, tab, *ctx.layout_args, ctx.smooth, need_u, need_table
                )
        g_u = None
        if need_u:
            g_x = g_x * inside if g_x is not None and g_x.numel() else None
            if g_phi is not None:
                g_x = g_phi if g_x is None else g_x + g_phi
            if g_x is not None:
                g_u = g_x @ linear_t.t()
        if need_table and g_table is not None and g_table.shape[0] < ctx.full_rows:
            g_table = functional.pad(g_table, (0, 0, 0, ctx.full_rows - g_table.shape[0]))
        return g_u, None, None, None, None, None, (g_table if need_table else None), *grads
