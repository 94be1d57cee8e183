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


def _points(d: int, n: int = 40, seed: int = 1):
    """Points in [-0.1, 1.1]^d: some fall outside the encoding's box (the clamp)."""
    g = torch.Generator().manual_seed(seed)
    return (1.2 * torch.rand(n, d, generator=g, dtype=torch.float64) - 0.1).requires_grad_(True)


def _both_paths(phi, u, jacobian: bool, monkeypatch):
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
        out = phi.forward_with_jacobian(u) if jacobian else (phi.forward_once(u),)
        if weights is None:
            weights = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in out]
        loss = sum((o * w).sum() for o, w in zip(out, weights, strict=True))
        params = [u, *phi.field.parameters()]
        grads = torch.autograd.grad(loss, params)
        results.append(([o.detach() for o in out], grads))
        monkeypatch.undo()
    return results


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("layers", [0, 1, 2])
@pytest.mark.parametrize("jacobian", [True, False])
def test_fused_pass_equals_the_op_by_op_map(d, layers, jacobian, device, monkeypatch):  # noqa: F811
    phi = _map(d, layers, inverse=d == 3)
    (out_f, grads_f), (out_r, grads_r) = _both_paths(phi, _points(d), jacobian, monkeypatch)
    for a, b in zip(out_f, out_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    names = ["u"] + [n for n, _ in phi.field.named_parameters()]
    for name, a, b in zip(names, grads_f, grads_r, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"gradient of {name}")


def test_fused_pass_with_switched_off_levels_and_smoothstep(monkeypatch):
    """Coarse-to-fine: the finer levels give zero features and receive no gradient."""
    phi = _map(3, interpolation="Smoothstep")
    phi.field.encoding.set_active_levels(2)
    (out_f, grads_f), (out_r, grads_r) = _both_paths(phi, _points(3), True, monkeypatch)
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


@pytest.mark.parametrize("jacobian", [True, False])
def test_fused_pass_gradcheck(jacobian, device):  # noqa: F811
    phi = _map(3, layers=1)
    u = _points(3, n=6)
    table, *params = phi.field.parameters()

    def f(u, table, *params):
        linear_t, offset = (t.double() for t in phi.affine.rows(phi.inverse))
        enc = phi.field.encoding
        return fused._MapPass.apply(u, linear_t, offset, jacobian, enc.layout, False, table, *params)

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
