"""``fields.fused``: one autograd node per map evaluation, against ``ComposedMap``'s op-by-op
path (values, Jacobians, first derivatives; float64) and ``gradcheck``, on the CPU twin and
the emulated CUDA kernels (``test_native``'s ``device`` fixture)."""

import os

import pytest
import torch

from neuralreg import FieldConfig, HashGridConfig, NeuralField
from neuralreg.fields import fused
from neuralreg.fields.affine import AffineMap, ComposedMap
from neuralreg.testing import check_derivatives
from tests.fields.test_native import device  # noqa: F401 (the fixture)

pytestmark = pytest.mark.skipif(
    os.environ.get("NEURALREG_NATIVE") == "0", reason="native kernels switched off (NEURALREG_NATIVE=0)"
)

SMALL = dict(n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=3, per_level_scale=1.8)


def _map(d: int, layers: int = 1, inverse: bool = False, seed: int = 0, interpolation: str = "Linear"):
    """A ComposedMap in float64 on the native backend with every parameter drawn (the last
    layer too: not the identity) and an oblique frozen affine part."""
    g = torch.Generator().manual_seed(seed)
    cfg = FieldConfig(
        encoding=HashGridConfig(**SMALL, interpolation=interpolation), hidden_width=8, hidden_layers=layers
    )
    field = NeuralField(d, cfg, g).double()
    field.set_backend("native")
    with torch.no_grad():
        for p in field.parameters():
            p.uniform_(-0.5, 0.5, generator=g)
    affine = AffineMap(d)  # float32, as in a run; both paths cast its rows to the points
    with torch.no_grad():
        affine.weight.copy_(0.2 * torch.rand(d, d, generator=g) - 0.1)
        affine.translation.copy_(0.1 * torch.rand(d, generator=g) - 0.05)
    affine.requires_grad_(False)
    return ComposedMap(field, affine, inverse)


def _points(d: int, n: int = 40, seed: int = 1, device: str = "cpu"):  # noqa: F811
    """Points in [-0.1, 1.1]^d: some fall outside the encoding's box (the clamp)."""
    g = torch.Generator().manual_seed(seed)
    return (1.2 * torch.rand(n, d, generator=g, dtype=torch.float64) - 0.1).to(device).requires_grad_(True)


def _both_paths(phi, u, jacobian, monkeypatch):
    """(fused, op-by-op) outputs of one evaluation, each with the gradients of a random
    linear function of it w.r.t. u and every parameter."""
    g = torch.Generator().manual_seed(2)
    weights = None
    results = []
    for path in ("fused", "reference"):
        if path == "reference":
            monkeypatch.setattr(fused, "applies", lambda phi, u: False)
        else:
            assert fused.applies(phi, u)
        if jacobian is None:
            out = (phi.forward_once(u),)
        else:
            out = phi.forward_with_jacobian(u, jacobian)
        if weights is None:
            weights = [torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device) for o in out]
        loss = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
        params = [u, *phi.field.parameters()]
        grads = torch.autograd.grad(loss, params)
        results.append(([o.detach() for o in out], grads))
        monkeypatch.undo()
    return results


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("jacobian", [None, 40, 15])
def test_fused_pass_equals_the_op_by_op_map(d, layers, jacobian, device, monkeypatch):  # noqa: F811
    """``jacobian``: None the value alone (``forward_once``), else the Jacobian at that many
    of the 40 points (15: the similarity's points after GradICON's, value only)."""
    phi = _map(d, layers, inverse=d == 3).to(device)
    (out_f, grads_f), (out_r, grads_r) = _both_paths(phi, _points(d, device=device), jacobian, monkeypatch)
    for a, b in zip(out_f, out_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    names = ["u"] + [n for n, _ in phi.field.named_parameters()]
    for name, a, b in zip(names, grads_f, grads_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_fused_pass_with_switched_off_levels_and_smoothstep(monkeypatch):
    """Coarse-to-fine: the finer levels give zero features and receive no gradient."""
    phi = _map(3, interpolation="Smoothstep")
    phi.field.encoding.set_active_levels(2)
    (out_f, grads_f), (out_r, grads_r) = _both_paths(phi, _points(3), 25, monkeypatch)
    for a, b in zip([*out_f, *grads_f], [*out_r, *grads_r], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    table_grad = grads_f[1]
    rows = phi.field.encoding.layout.first(2).n_params_rows
    assert table_grad[:rows].abs().sum() > 0 and table_grad[rows:].abs().sum() == 0


def test_only_one_output_used():
    """GradICON's outer map uses the Jacobian alone, the similarity the value alone: the
    unused output's gradient is None inside the node, and the result is that of a zero."""
    phi = _map(3)
    u = _points(3)
    value, jac = phi.forward_with_jacobian(u)
    g_jac_only = torch.autograd.grad(jac.square().sum(), [u, *phi.field.parameters()])
    value, jac = phi.forward_with_jacobian(u)
    g_both = torch.autograd.grad(jac.square().sum() + 0 * value.sum(), [u, *phi.field.parameters()])
    for a, b in zip(g_jac_only, g_both, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("n_jacobian", [6, 3, 0])
def test_fused_pass_gradcheck(n_jacobian, device):  # noqa: F811
    phi = _map(3, layers=1).to(device)
    u = _points(3, n=6, device=device)
    table, *params = phi.field.parameters()

    def f(u, table, *params):
        linear_t, offset = (t.double() for t in phi.affine.rows(phi.inverse))
        enc = phi.field.encoding
        return fused._MapPass.apply(u, linear_t, offset, n_jacobian, enc.layout, False, table, *params)

    check_derivatives(f, (u, table, *params), second_atol=None)


def test_applies_only_where_its_conditions_hold():
    phi = _map(3)
    u = _points(3)
    assert fused.applies(phi, u)
    assert not fused.applies(phi, u.float())  # dtypes differ
    with torch.no_grad():
        assert not fused.applies(phi, u)  # no graph: the plain layers
    phi.affine.requires_grad_(True)
    assert not fused.applies(phi, u)  # the affine fit: T's gradient
    phi.affine.requires_grad_(False)
    phi.field.set_backend("torch")
    assert not fused.applies(phi, u)
    silu = _map(3)
    silu.field.config = FieldConfig(activation="silu")
    assert not fused.applies(silu, u)


def test_similarity_points_in_the_gradicon_passes_change_nothing(monkeypatch):
    """GradICON both ways with the similarity's points riding in its passes (``values_at``):
    the same term, the maps' values at those points and every gradient as three passes
    plus two of their own, op by op."""
    from neuralreg.losses import regularizers

    phi_ab, phi_ba = _map(3, seed=0), _map(3, inverse=True, seed=3)
    u_moving, u_fixed = _points(3, 12, seed=4), _points(3, 12, seed=5)
    v_ab, v_ba = _points(3, 30, seed=6), _points(3, 20, seed=7)
    params = [*phi_ab.field.parameters(), *phi_ba.field.parameters()]
    results = []
    for path in ("folded", "separate"):
        if path == "folded":
            reg, (y_ab, y_ba) = regularizers.gradicon_analytic_both_ways(
                phi_ab, phi_ba, u_moving, u_fixed, volume_weight=0.5, values_at=(v_ab, v_ba)
            )
        else:
            monkeypatch.setattr(fused, "applies", lambda phi, u: False)
            reg = regularizers.gradicon_analytic_both_ways(phi_ab, phi_ba, u_moving, u_fixed, volume_weight=0.5)
            y_ab, y_ba = phi_ab(v_ab), phi_ba(v_ba)
        loss = reg + y_ab.square().sum() + (y_ba * 0.3).sum()
        results.append([reg, y_ab, y_ba, *torch.autograd.grad(loss, params + [u_moving, v_ab, v_ba])])
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-10, atol=1e-12)
