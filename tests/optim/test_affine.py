"""The global affine part: exact inverse, Jacobian of the composed map, recovery of a known
misalignment, save/load, and the ITK transform file (read back by SimpleITK)."""

import math

import numpy as np
import pytest
import torch

from neuralreg import Image, RegistrationConfig, register_pair
from neuralreg.config import FieldConfig
from neuralreg.fields.affine import AffineMap, ComposedMap, world_matrix
from neuralreg.fields.field import NeuralField
from neuralreg.geometry.coordinates import NormalizedBox
from neuralreg.losses import regularizers
from neuralreg.metrics import dice
from neuralreg.phantoms import _blur, triangles_pair
from neuralreg.result import Registration


def random_affine(d, seed=0):
    torch.manual_seed(seed)
    a = AffineMap(d)
    with torch.no_grad():
        a.weight.normal_(0, 0.1)
        a.translation.normal_(0, 0.05)
    return a


@pytest.mark.parametrize("d", [2, 3])
def test_inverse_is_exact_and_set_matrix_round_trips(d):
    a = random_affine(d)
    u = torch.rand(100, d)
    torch.testing.assert_close(a.apply(a.apply(u), inverse=True), u, atol=1e-5, rtol=0)
    b = AffineMap(d)
    b.set_matrix(a.matrix().detach().numpy())
    torch.testing.assert_close(b.apply(u), a.apply(u), atol=1e-6, rtol=0)
    # the identity parametrization keeps the box center fixed
    assert torch.allclose(AffineMap(d).apply(torch.full((1, d), 0.5)), torch.full((1, d), 0.5))


@pytest.mark.parametrize("inverse", [False, True])
def test_composed_map_jacobian_matches_autograd(inverse):
    d = 3
    field = NeuralField(d, FieldConfig(activation="silu", backend="torch"))
    torch.manual_seed(1)
    with torch.no_grad():
        field.mlp[-1].weight.normal_(0, 0.1)
    phi = ComposedMap(field, random_affine(d, 2), inverse)
    u = torch.rand(64, d, requires_grad=True)
    y, jac = phi.forward_with_jacobian(u)
    ref = regularizers.jacobian_autograd(phi(u), u)
    torch.testing.assert_close(y, phi(u))
    torch.testing.assert_close(jac, ref, atol=1e-5, rtol=1e-4)


def test_gradicon_of_affine_only_maps_is_zero_and_analytic_agrees():
    d = 3
    a = random_affine(d, 3)
    ab = ComposedMap(NeuralField(d, FieldConfig(backend="torch")), a, False)
    ba = ComposedMap(NeuralField(d, FieldConfig(backend="torch")), a, True)
    u = torch.rand(256, d)
    assert float(regularizers.gradicon(ab, ba, u).detach()) < 1e-9
    assert float(regularizers.icon(ab, ba, u).detach()) < 1e-10
    with torch.no_grad():
        ab.field.mlp[-1].weight.normal_(0, 0.05)
    torch.testing.assert_close(regularizers.gradicon_analytic(ab, ba, u), regularizers.gradicon(ab, ba, u))


def rigid_2d(angle_deg, shift):
    t = math.radians(angle_deg)
    g = np.eye(3)
    g[:2, :2] = [[math.cos(t), -math.sin(t)], [math.sin(t), math.cos(t)]]
    g[:2, 2] = shift
    return g


@pytest.fixture(scope="module")
def misaligned():
    """The same 2D image on two grids that differ by a known rigid motion G: Phi_AB = G."""
    pair = triangles_pair(0)
    fixed = pair["fixed"].with_data(_blur(pair["fixed"].data, 1.5))
    labels = pair["fixed_labels"]
    center = np.eye(3)
    center[:2, 2] = -63.5
    g = np.linalg.inv(center) @ rigid_2d(20.0, (24.0, -18.0)) @ center
    moving = Image(fixed.data, g @ fixed.affine)
    moving_labels = Image(labels.data, g @ fixed.affine)
    return fixed, labels, moving, moving_labels, g


def test_affine_part_recovers_a_known_rigid_misalignment(misaligned):
    fixed, labels, moving, moving_labels, g = misaligned
    cfg = RegistrationConfig(steps=1, affine_steps=300, points=4096, similarity="mse", fine_similarity=None)
    reg = register_pair(moving, fixed, cfg)
    found = reg.affine_world()
    np.testing.assert_allclose(found[:2, :2], g[:2, :2], atol=0.02)
    np.testing.assert_allclose(found[:2, 2], g[:2, 2], atol=1.0)  # mm = pixels here
    after = dice(reg.warp(moving_labels, mode="nearest").data, labels.data)["mean"]
    without = register_pair(moving, fixed, RegistrationConfig(steps=1, affine_steps=0))
    before = dice(without.warp(moving_labels, mode="nearest").data, labels.data)["mean"]
    assert before < 0.6 and after > 0.9


def test_save_load_and_itk_transform_file(misaligned, tmp_path):
    sitk = pytest.importorskip("SimpleITK")
    from neuralreg.io import write_itk_affine

    fixed, _, moving, _, _ = misaligned
    reg = register_pair(moving, fixed, RegistrationConfig(steps=5, affine_steps=40, points=1024))
    reg.save(tmp_path / "r.pt")
    back = Registration.load(tmp_path / "r.pt")
    np.testing.assert_allclose(back.affine_world(), reg.affine_world(), atol=1e-5)
    pts = torch.rand(50, 2) * 127
    torch.testing.assert_close(back.map_points(pts), reg.map_points(pts))

    write_itk_affine(reg.affine_world(), tmp_path / "a.tfm")
    tfm = sitk.ReadTransform(str(tmp_path / "a.tfm"))
    m = reg.affine_world()
    for x in pts[:5].double().numpy():
        lps = tfm.TransformPoint((-float(x[0]), -float(x[1])))
        ours = m[:2, :2] @ x + m[:2, 2]
        np.testing.assert_allclose([-lps[0], -lps[1]], ours, atol=1e-6)


def test_world_matrix_conjugates_the_box():
    box = NormalizedBox(center=np.array([10.0, -5.0, 3.0]), scale=120.0)
    a = random_affine(3, 4)
    x = torch.randn(20, 3, dtype=torch.float64) * 30
    via_box = box.to_world(a.apply(box.to_normalized(x).float()).double())
    m = world_matrix(a.matrix().detach().double().numpy(), box)
    torch.testing.assert_close(x @ torch.as_tensor(m[:3, :3]).T + torch.as_tensor(m[:3, 3]), via_box, atol=1e-3, rtol=0)


def test_matrix_kept_without_graph_follows_every_change_of_the_parameters():
    a = random_affine(3, 1)
    a.requires_grad_(False)
    m = a.matrix(inverse=True)
    assert a.matrix(inverse=True) is m  # kept while the parameters stay
    other = random_affine(3, 2)
    a.set_matrix(other.matrix().detach())  # in place: a new version
    torch.testing.assert_close(a.matrix(inverse=True), torch.linalg.inv(other.matrix().detach()))
    a.load_state_dict(random_affine(3, 3).state_dict())
    torch.testing.assert_close(a.matrix(), random_affine(3, 3).matrix().detach())
    a.requires_grad_(True)  # fitted: a fresh matrix with its graph on every call
    assert a.matrix().grad_fn is not None and a.matrix() is not a.matrix()
    with torch.no_grad():
        assert a.matrix().grad_fn is None


def test_gradicon_both_ways_is_the_two_terms_in_three_passes():
    """``gradicon_analytic_both_ways``: the mean of the two one-way terms (Phi_AB o Phi_BA at
    moving points, Phi_BA o Phi_AB at fixed points), value and parameter gradients, float64."""
    d = 3
    a = random_affine(d, 4)
    fields = [NeuralField(d, FieldConfig(activation="silu", backend="torch")).double() for _ in range(2)]
    with torch.no_grad():
        for f in fields:
            f.mlp[-1].weight.normal_(0, 0.1)
            f.encoding.table.uniform_(-0.1, 0.1)
    ab, ba = ComposedMap(fields[0], a, False), ComposedMap(fields[1], a, True)
    g = torch.Generator().manual_seed(0)
    u_moving, u_fixed = (torch.rand(64, d, generator=g, dtype=torch.float64) for _ in range(2))
    params = list(fields[0].parameters()) + list(fields[1].parameters())

    def value_and_grads(fn):
        value = fn()
        return value.detach(), torch.autograd.grad(value, params, allow_unused=True)

    both, both_grads = value_and_grads(lambda: regularizers.gradicon_analytic_both_ways(ab, ba, u_moving, u_fixed))
    ways, ways_grads = value_and_grads(
        lambda: (
            0.5 * (regularizers.gradicon_analytic(ab, ba, u_moving) + regularizers.gradicon_analytic(ba, ab, u_fixed))
        )
    )
    torch.testing.assert_close(both, ways, rtol=1e-12, atol=0)
    assert both > 1e-4  # the fields are not the identity: the check has something to compare
    for x, y in zip(both_grads, ways_grads, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-10, atol=1e-14)
