"""Neural field, coordinate conventions and image sampling."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from neuralreg import FieldConfig, HashGridConfig, Image, NeuralField
from neuralreg.geometry.coordinates import NormalizedBox, apply_affine, grid_points
from neuralreg.geometry.interpolation import sample_image

SMALL_FIELD = FieldConfig(encoding=HashGridConfig(n_levels=4, log2_hashmap_size=10), hidden_width=16, backend="torch")


@pytest.mark.parametrize("d", [2, 3])
def test_new_field_is_identity_and_trainable(d):
    f = NeuralField(d, SMALL_FIELD)
    u = torch.rand(100, d)
    assert torch.equal(f(u), u)
    f(u).sum().backward()
    assert f.mlp[-1].weight.grad.abs().sum() > 0


def test_a_field_draws_only_from_its_generator_and_imports_no_symbolic_machinery():
    """A field is drawn from its generator alone (reproducible, nothing taken from torch's
    global generator) and, unlike ``skip_init``'s meta device, without importing sympy,
    0.3-0.5 s of a command's start (a fresh interpreter)."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from neuralreg import FieldConfig, NeuralField\n"
        "state = torch.random.get_rng_state()\n"
        "g = torch.Generator().manual_seed(3)\n"
        "f = NeuralField(3, FieldConfig(), g)\n"
        "assert torch.equal(state, torch.random.get_rng_state()), 'global generator used'\n"
        "again = NeuralField(3, FieldConfig(), torch.Generator().manual_seed(3)).state_dict()\n"
        "assert all(torch.equal(v, again[k]) for k, v in f.state_dict().items()), 'not reproducible'\n"
        "assert f.mlp[0].weight.abs().min() > 0 and f.mlp[0].bias.abs().max() > 0, 'not drawn'\n"
        "assert 'sympy' not in sys.modules, 'sympy imported'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]


def test_box_is_isotropic_and_contains_both_grids():
    aff_a = np.diag([0.7, 0.365, 0.365, 1.0])
    aff_b = np.diag([0.7, 0.365, 0.365, 1.0])
    aff_b[:3, 3] = [5, -3, 2]
    box = NormalizedBox.around([((160, 384, 384), aff_a), ((160, 384, 384), aff_b)], margin=0.1)
    corners = torch.tensor([[0, 0, 0], [159, 383, 383]], dtype=torch.float64)
    for aff in (aff_a, aff_b):
        u = apply_affine(box.voxel_to_normalized_matrix(aff), corners)
        assert (u >= 0).all() and (u <= 1).all()
    m = box.voxel_to_normalized_matrix(aff_a)
    # one mm is the same normalized length along every axis
    np.testing.assert_allclose(np.diag(m)[:3] / np.array([0.7, 0.365, 0.365]), 1 / box.scale)
    x = torch.randn(10, 3, dtype=torch.float64)
    torch.testing.assert_close(box.to_world(box.to_normalized(x)), x)


def test_oblique_affine_round_trip():
    rot = np.array([[np.cos(0.3), -np.sin(0.3), 0], [np.sin(0.3), np.cos(0.3), 0], [0, 0, 1]])
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([1.0, 2.0, 0.5])
    aff[:3, 3] = [10, 20, -5]
    box = NormalizedBox.around([((10, 12, 14), aff)])
    vox = grid_points((10, 12, 14), dtype=torch.float64)
    m = box.voxel_to_normalized_matrix(aff)
    back = apply_affine(np.linalg.inv(m), apply_affine(m, vox))
    torch.testing.assert_close(back, vox)


@pytest.mark.parametrize("d", [2, 3])
def test_sampling_reproduces_voxels_and_linear_functions(d):
    shape = (5, 6, 7)[:d]
    vox = grid_points(shape, dtype=torch.float64)
    coeff = torch.tensor([0.3, -1.2, 0.7][:d], dtype=torch.float64)
    img = (vox @ coeff + 2.0).reshape(shape)
    torch.testing.assert_close(sample_image(img, vox), img.reshape(-1))
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(50, d, generator=g, dtype=torch.float64) * (torch.tensor(shape[:d], dtype=torch.float64) - 1)
    pts.requires_grad_(True)
    val = sample_image(img, pts)
    torch.testing.assert_close(val, pts.detach() @ coeff + 2.0)
    (grad,) = torch.autograd.grad(val.sum(), pts)
    torch.testing.assert_close(grad, coeff.expand_as(grad))


def test_sampling_outside_rule():
    img = torch.ones(4, 4, dtype=torch.float64)
    pts = torch.tensor([[-0.5, 1.0], [-1.0, 1.0], [-5.0, 2.0], [3.5, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(sample_image(img, pts), torch.tensor([0.5, 0.0, 0.0, 0.5], dtype=torch.float64))
    torch.testing.assert_close(sample_image(img, pts, padding="border"), torch.ones(4, dtype=torch.float64))


def test_sampling_matches_grid_sample_axis_order():
    """In float64 and from a seeded draw: in float32 grid_sample's normalized coordinates
    (1/3 * 2 - 1 is not exact) land off the voxel by about 1e-7 of its side, which an
    unseeded image could turn into more than approx's relative 1e-6 on a small value."""
    img = torch.rand(4, 5, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pts = torch.tensor([[1.0, 2.0, 3.0]], dtype=torch.float64)
    assert sample_image(img, pts).item() == pytest.approx(img[1, 2, 3].item())
    grid = torch.tensor([[[[[3 / 5 * 2 - 1, 2 / 4 * 2 - 1, 1 / 3 * 2 - 1]]]]], dtype=torch.float64)
    ref = F.grid_sample(img[None, None], grid, align_corners=True).item()
    assert sample_image(img, pts).item() == pytest.approx(ref)


def test_image_downsample_keeps_world_position():
    aff = np.diag([2.0, 1.0, 1.0])
    aff[:2, 2] = [10, -4]
    img = Image(torch.arange(64.0).reshape(8, 8), aff)
    small = img.downsample(2)
    # the world position of a coarse voxel center is the mean of its fine voxels' centers
    fine_centers = apply_affine(aff, torch.tensor([[0.0, 0.0], [1, 0], [0, 1], [1, 1]], dtype=torch.float64)).mean(0)
    coarse_center = apply_affine(small.affine, torch.zeros(1, 2, dtype=torch.float64))[0]
    torch.testing.assert_close(coarse_center, fine_centers)
    assert small.data[0, 0].item() == pytest.approx(img.data[:2, :2].mean().item())


def test_image_downsample_gives_float32_at_every_factor():
    """A float64 image (as nibabel reads most files) gives float32 levels, the finest
    included: the engine reads a level as float32 several times a step, and a float64 level
    was converted anew on each read. A float32 level at factor 1 is the image itself."""
    img = Image(torch.rand(6, 6, 4, dtype=torch.float64), np.eye(4))
    for factor in (1, 2):
        level = img.downsample(factor)
        assert level.data.dtype == torch.float32
    torch.testing.assert_close(img.downsample(1).data, img.data.float())
    same = Image(torch.rand(4, 4), np.eye(3))
    assert same.downsample(1) is same


@pytest.mark.parametrize("activation", ["relu", "silu", "softplus", "tanh"])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_mlp_push_forward_matches_autograd_and_gradcheck(activation, layers):
    """The MLP's Jacobian push-forward (one autograd node, its backward written out) against
    autograd of the MLP itself (values, Jacobian) and against finite differences (gradcheck,
    float64, all inputs: features, their Jacobian, every weight and bias)."""
    from neuralreg.fields.field import _derivatives, _PushForward, _relu

    cfg = FieldConfig(hidden_width=5, hidden_layers=layers, activation=activation, backend="torch")
    field = NeuralField(3, cfg, generator=torch.Generator().manual_seed(0)).double()
    torch.nn.init.normal_(field.mlp[-1].weight, std=0.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    n, width = 7, field.encoding.n_output_dims
    x = torch.rand(n, 3, generator=g, dtype=torch.float64, requires_grad=True)
    a = torch.randn(width, 3, generator=g, dtype=torch.float64)
    feats = torch.tanh(x @ a.T)  # features of x, their Jacobian known: (1 - feats^2) a
    jac = (1 - feats**2)[:, :, None] * a[None]
    derivatives = _derivatives(field.mlp[1]) if layers else _relu
    params = [p for layer in field.mlp if isinstance(layer, torch.nn.Linear) for p in (layer.weight, layer.bias)]
    y, t = _PushForward.apply(feats, jac, derivatives, *params)
    torch.testing.assert_close(y, field.mlp(feats))
    reference = torch.stack(
        [torch.autograd.grad(field.mlp(torch.tanh(x @ a.T))[:, i].sum(), x, retain_graph=True)[0] for i in range(3)], 1
    )
    torch.testing.assert_close(t, reference)
    inputs = (
        feats.detach().requires_grad_(),
        jac.detach().requires_grad_(),
        *[p.detach().requires_grad_() for p in params],
    )
    assert torch.autograd.gradcheck(lambda f, j, *ps: _PushForward.apply(f, j, derivatives, *ps), inputs)
    # where only the Jacobian is used (GradICON's outer map), the value's gradient is None
    assert torch.autograd.gradcheck(lambda f, j, *ps: _PushForward.apply(f, j, derivatives, *ps)[1], inputs)


@pytest.mark.parametrize("activation", ["relu", "silu", "softplus", "tanh"])
@pytest.mark.parametrize("layers", [0, 1, 2])
def test_mlp_node_is_the_mlp_and_gradcheck(activation, layers):
    """With a graph recorded, the field's MLP is one autograd node (``_MLP``, its backward
    written out): the value of the layers themselves bit for bit, autograd's gradients (in
    the features and every weight and bias) to rounding, and first and second derivatives
    against finite differences (float64; the second by autograd through the layers)."""
    from neuralreg.fields.field import _MLP

    cfg = FieldConfig(hidden_width=5, hidden_layers=layers, activation=activation, backend="torch")
    field = NeuralField(3, cfg, generator=torch.Generator().manual_seed(0)).double()
    torch.nn.init.normal_(field.mlp[-1].weight, std=0.5, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    feats = torch.randn(7, field.encoding.n_output_dims, generator=g, dtype=torch.float64, requires_grad=True)
    params = field._mlp_parameters()
    node = _MLP.apply(feats, field.mlp, *params)
    assert type(node.grad_fn).__name__ == "_MLPBackward"
    reference = field.mlp(feats)
    assert torch.equal(node, reference)
    weights = torch.randn(node.shape, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad(node, (feats, *params), weights)
    slow = torch.autograd.grad(reference, (feats, *params), weights)
    for a, b in zip(fast, slow, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-12)
    inputs = (feats, *params)
    assert torch.autograd.gradcheck(lambda f, *ps: _MLP.apply(f, field.mlp, *ps), inputs)
    assert torch.autograd.gradgradcheck(lambda f, *ps: _MLP.apply(f, field.mlp, *ps), inputs)
