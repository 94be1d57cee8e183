"""GradICON and friends on analytic maps, and against icon_registration's definition."""

import math

import pytest
import torch

from neuralreg.losses import regularizers


def shear_pair(a=0.3, k=3.0):
    """phi(x) = (x0, x1 + a sin(k x0)[, x2 + a x0 x1]) and its exact inverse."""

    def fwd(x):
        y1 = x[:, 1] + a * torch.sin(k * x[:, 0])
        cols = [x[:, 0], y1]
        if x.shape[1] == 3:
            cols.append(x[:, 2] + a * x[:, 0] * y1)
        return torch.stack(cols, 1)

    def inv(y):
        x1 = y[:, 1] - a * torch.sin(k * y[:, 0])
        cols = [y[:, 0], x1]
        if y.shape[1] == 3:
            cols.append(y[:, 2] - a * y[:, 0] * y[:, 1])
        return torch.stack(cols, 1)

    return fwd, inv


def points(d, n=500, seed=0):
    return torch.rand(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


@pytest.mark.parametrize("d", [2, 3])
def test_gradicon_zero_for_exact_inverses(d):
    fwd, inv = shear_pair()
    u = points(d)
    assert regularizers.gradicon(fwd, inv, u).item() < 1e-20
    assert regularizers.gradicon_fd(fwd, inv, u, 1e-4).item() < 1e-12
    assert regularizers.icon(fwd, inv, u).item() < 1e-25


@pytest.mark.parametrize("d", [2, 3])
def test_gradicon_closed_form_and_fd_agree(d):
    # phi_ab o phi_ba = shear o shear: Jacobian known in closed form in 2D
    fwd, _ = shear_pair(0.2, 2.0)
    u = points(d)
    auto = regularizers.gradicon(fwd, fwd, u)
    fd = regularizers.gradicon_fd(fwd, fwd, u, 1e-5)
    assert auto.item() > 1e-3
    torch.testing.assert_close(auto, fd, rtol=1e-4, atol=0)
    if d == 2:
        # composition: y1 = x1 + a sin(k x0) + a sin(k x0) -> dy1/dx0 = 2 a k cos(k x0)
        want = ((2 * 0.2 * 2.0 * torch.cos(2.0 * u[:, 0])) ** 2).mean()
        torch.testing.assert_close(auto, want, rtol=1e-12, atol=0)


def test_gradicon_affine_closed_form():
    a = torch.tensor([[1.1, 0.2], [-0.1, 0.9]], dtype=torch.float64)

    def f(x):
        return x @ a.T + 0.1

    u = points(2)
    want = ((a @ a - torch.eye(2, dtype=torch.float64)) ** 2).sum()
    torch.testing.assert_close(regularizers.gradicon(f, f, u), want)


def test_gradicon_is_differentiable_wrt_parameters():
    w = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)

    def f(x):
        return torch.stack([x[:, 0], x[:, 1] + w * torch.sin(3 * x[:, 0])], 1)

    loss = regularizers.gradicon(f, f, points(2))
    (g,) = torch.autograd.grad(loss, w)
    # d/dw mean (6 w cos 3x0)^2 = 72 w mean cos^2
    want = 72 * w.detach() * (torch.cos(3 * points(2)[:, 0]) ** 2).mean()
    torch.testing.assert_close(g, want)


def test_diffusion_and_bending_closed_form():
    def f(x):  # displacement 0.1 * x0^2 along axis 1
        return torch.stack([x[:, 0], x[:, 1] + 0.1 * x[:, 0] ** 2], 1)

    u = points(2)
    torch.testing.assert_close(regularizers.diffusion(f, f, u), 2 * ((0.2 * u[:, 0]) ** 2).mean())
    torch.testing.assert_close(regularizers.bending(f, f, u), torch.tensor(2 * 0.04, dtype=torch.float64))


@pytest.mark.parametrize("d", [2, 3])
def test_relation_to_icon_registration_gradient_icon(d):
    """Ours == d * icon_registration.losses.GradientICON on the same maps (it averages over channels)."""
    losses = pytest.importorskip("icon_registration.losses", reason="pip install --no-deps icon_registration")
    torch.set_default_dtype(torch.float64)
    try:
        shape = (1, d) + (12,) * d
        axes = [torch.linspace(0, 1, 12) for _ in range(d)]
        identity = torch.stack(torch.meshgrid(*axes, indexing="ij"))[None]
        a = torch.tensor([[1.05, 0.1, 0.0], [-0.05, 0.95, 0.02], [0.03, 0.0, 1.1]], dtype=torch.float64)[:d, :d]

        def as_channels(f):
            return lambda t: f(t.movedim(1, -1).reshape(-1, d)).reshape(t.shape[0], *t.shape[2:], d).movedim(-1, 1)

        def phi_ab(x):
            return x @ a.T

        def phi_ba(x):
            return x @ a.T + 0.02 * torch.sin(math.pi * x)

        holder = type("H", (), {"identity_map": identity})()
        torch.manual_seed(0)
        theirs = losses.GradientICON.compute_gradient_icon_loss(holder, as_channels(phi_ab), as_channels(phi_ba))
        torch.manual_seed(0)
        eps_points = identity + torch.randn(*shape) / shape[-1]
        ours = regularizers.gradicon(phi_ab, phi_ba, eps_points.movedim(1, -1).reshape(-1, d))
        torch.testing.assert_close(theirs * d, ours, rtol=2e-3, atol=0)  # their FD step is 1e-3
    finally:
        torch.set_default_dtype(torch.float32)


def test_product_penalty_node_is_autograds_expression_and_gradcheck():
    """GradICON's last part, mean ||outer inner - I||_F^2 of two stacks of Jacobians, is one
    autograd node (``_ProductPenalty``): autograd's value bit for bit, its gradients to
    rounding, first and second derivatives against finite differences (float64)."""
    from neuralreg.losses.regularizers import _product_penalty

    g = torch.Generator().manual_seed(4)
    outer, inner = (torch.randn(30, 3, 3, generator=g, dtype=torch.float64).requires_grad_() for _ in range(2))
    node = _product_penalty(outer, inner)
    assert type(node.grad_fn).__name__ == "_ProductPenaltyBackward"
    reference = ((torch.matmul(outer, inner) - torch.eye(3, dtype=torch.float64)) ** 2).sum((1, 2)).mean()
    assert torch.equal(node, reference)
    for fast, slow in zip(torch.autograd.grad(node, (outer, inner)), torch.autograd.grad(reference, (outer, inner))):
        torch.testing.assert_close(fast, slow, rtol=1e-12, atol=1e-14)
    small = tuple(t.detach()[:4].clone().requires_grad_() for t in (outer, inner))
    assert torch.autograd.gradcheck(_product_penalty, small)
    assert torch.autograd.gradgradcheck(_product_penalty, small)


@pytest.mark.parametrize("d", [2, 3])
def test_determinant_of_a_stack_is_torchs(d):
    from neuralreg.metrics import det_of_columns

    jac = torch.randn(50, d, d, generator=torch.Generator().manual_seed(d), dtype=torch.float64)
    torch.testing.assert_close(det_of_columns(jac.unbind(-1)), torch.linalg.det(jac), rtol=1e-12, atol=1e-14)


def test_log_volume_penalty_closed_form_and_derivatives():
    """mean (log det J)^2 of a map without an affine part: diag(s) gives (log prod s)^2, a
    shrink by half costs what a growth to double does, a fold is bounded by the floor;
    first and second derivatives against finite differences (float64)."""
    scales = torch.tensor([[0.5, 1.0, 1.0], [2.0, 1.0, 1.0], [1.2, 0.9, 1.1]], dtype=torch.float64)
    jac = torch.diag_embed(scales)
    per_point = torch.log(scales.prod(1)) ** 2
    torch.testing.assert_close(regularizers.log_volume_penalty(None, jac), per_point.mean())
    torch.testing.assert_close(per_point[0], per_point[1])
    folded = -torch.eye(3, dtype=torch.float64)[None]
    torch.testing.assert_close(
        regularizers.log_volume_penalty(None, folded), torch.tensor(math.log(1e-3) ** 2).double()
    )
    g = torch.Generator().manual_seed(5)
    near_identity = torch.eye(3, dtype=torch.float64) + 0.2 * torch.randn(4, 3, 3, generator=g, dtype=torch.float64)
    near_identity.requires_grad_()
    assert torch.autograd.gradcheck(lambda j: regularizers.log_volume_penalty(None, j), near_identity)
    assert torch.autograd.gradgradcheck(lambda j: regularizers.log_volume_penalty(None, j), near_identity)


def test_log_volume_penalty_reads_the_field_not_the_affine_part():
    """A new field under any affine part changes no volume (0); a field that scales its
    input by s costs (d log s)^2 whatever the affine part, in both directions."""
    from neuralreg.config import FieldConfig
    from neuralreg.fields.affine import AffineMap, ComposedMap
    from neuralreg.fields.field import NeuralField

    torch.manual_seed(0)
    affine = AffineMap(3)
    with torch.no_grad():
        affine.weight.copy_(torch.tensor([[0.3, 0.1, 0.0], [0.0, -0.2, 0.1], [0.05, 0.0, 0.1]]))
    u = torch.rand(128, 3)
    for inverse in (False, True):
        phi = ComposedMap(NeuralField(3, FieldConfig(backend="torch")), affine, inverse)
        _, jac = phi.forward_with_jacobian(u)
        assert float(regularizers.log_volume_penalty(phi, jac).detach()) < 1e-10
        s = 0.8
        torch.testing.assert_close(
            regularizers.log_volume_penalty(phi, s * jac), torch.tensor((3 * math.log(s)) ** 2), rtol=1e-4, atol=0
        )


def test_gradicon_both_ways_adds_the_weighted_volume_terms():
    from neuralreg.config import FieldConfig
    from neuralreg.fields.affine import AffineMap, ComposedMap
    from neuralreg.fields.field import NeuralField

    torch.manual_seed(1)
    affine = AffineMap(3)
    ab = ComposedMap(NeuralField(3, FieldConfig(activation="silu", backend="torch")), affine, False)
    ba = ComposedMap(NeuralField(3, FieldConfig(activation="silu", backend="torch")), affine, True)
    with torch.no_grad():
        for phi in (ab, ba):
            phi.field.mlp[-1].weight.normal_(0, 2.0)
    u_moving, u_fixed = torch.rand(64, 3), torch.rand(64, 3)
    plain = regularizers.gradicon_analytic_both_ways(ab, ba, u_moving, u_fixed)
    weighted = regularizers.gradicon_analytic_both_ways(ab, ba, u_moving, u_fixed, volume_weight=2.0)
    volume = 0.5 * (
        regularizers.log_volume_penalty(ab, ab.forward_with_jacobian(u_fixed)[1])
        + regularizers.log_volume_penalty(ba, ba.forward_with_jacobian(u_moving)[1])
    )
    assert float(volume.detach()) > 1e-4
    torch.testing.assert_close(weighted, plain + 2.0 * volume, rtol=1e-5, atol=1e-7)
