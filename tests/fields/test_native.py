"""Native kernels against the PyTorch reference: values, first and second derivatives (float64).

``device`` runs each check on the CPU twin, on the CUDA kernels emulated on the CPU
(``native.emulate_cuda``: the real .cu sources, every launch run block by block) and,
where there is a GPU, on the CUDA kernels themselves.
"""

import os

import pytest
import torch
from torch.utils import cpp_extension

from neuralreg import FieldConfig, HashGridConfig, HashGridEncoding, NeuralField
from neuralreg.fields import native
from neuralreg.fields.reference import hashgrid_encode_torch
from neuralreg.geometry.interpolation import sample_image
from neuralreg.losses import regularizers
from neuralreg.testing import check_derivatives

# A build that should work here is tested, never skipped: the CPU twin and the emulated
# CUDA kernels need only a C++ compiler; the CUDA build wherever torch sees a GPU and a
# CUDA toolkit is installed. A failed build fails these tests with the compiler's first
# error (``native.status``).
pytestmark = pytest.mark.skipif(
    os.environ.get("NEURALREG_NATIVE") == "0", reason="native kernels switched off (NEURALREG_NATIVE=0)"
)
GPU_BUILD = torch.cuda.is_available() and cpp_extension.CUDA_HOME is not None

DEVICES = [
    "cpu",
    "emulated",
    pytest.param("cuda", marks=pytest.mark.skipif(not GPU_BUILD, reason="no GPU, or no CUDA toolkit (nvcc)")),
]


def test_the_builds_that_should_work_here_do():
    for kind in ("cpu", "emulated") + (("cuda",) if GPU_BUILD else ()):
        assert native.status(kind).startswith("available"), f"{kind}: {native.status(kind)}"


@pytest.fixture(params=DEVICES)
def device(request):
    """The torch device of the kernels under test ("emulated": CPU tensors, CUDA sources)."""
    if request.param == "emulated":
        with native.emulate_cuda():
            yield "cpu"
    else:
        yield request.param


CFG = dict(n_levels=5, n_features_per_level=2, log2_hashmap_size=9, base_resolution=3, per_level_scale=1.8)


def _encoding(d, interp, dtype=torch.float64, features=2):
    cfg = {**CFG, "n_features_per_level": features}
    enc = HashGridEncoding(d, HashGridConfig(**cfg, interpolation=interp)).to(dtype)
    with torch.no_grad():  # its own generator: the same table whatever the tests before left in the global one
        enc.table.uniform_(-1, 1, generator=torch.Generator().manual_seed(0))
    assert any(enc.layout.hashed) and not all(enc.layout.hashed)
    return enc


def _points(d, n=64, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, d, generator=g, dtype=dtype)
    x[0] = 0.0
    x[1] = 1.0
    # exact cell corners of level 0 (scale 2): pos = 2x + 0.5 integer
    x[2] = 0.25
    x[3] = 0.75
    return x


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("interp", ["Linear", "Smoothstep"])
@pytest.mark.parametrize("features", [2, 3])  # the CPU kernels' compile-time width, and a run-time one
def test_values_and_derivatives_match_reference(d, interp, features, device):
    enc = _encoding(d, interp, features=features).to(device)
    smooth = interp == "Smoothstep"
    x = _points(d).to(device)

    def run(fn):
        xx = x.clone().requires_grad_(True)
        table = enc.table.detach().clone().requires_grad_(True)
        y = fn(xx, table)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype).to(y.device)
        gx, gt = torch.autograd.grad((y * w).sum(), (xx, table), create_graph=True)
        second = (gx**2).sum() + (gx * y[:, :d]).sum()
        g2x, g2t = torch.autograd.grad(second, (xx, table))
        return y.detach(), gx.detach(), gt.detach(), g2x, g2t

    ref = run(lambda xx, t: hashgrid_encode_torch(xx, t, enc.indexer(), smooth))
    nat = run(lambda xx, t: native.hashgrid_encode(xx, t, enc.layout, smooth))
    for a, b, name in zip(ref, nat, ["values", "d/dx", "d/dtable", "d2/dx2", "d2/dx dtable"]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-11, msg=name)


@pytest.mark.parametrize("d", [2, 3])
def test_switched_off_levels_are_skipped_with_the_same_result(d, device):
    """With 3 of 5 levels active the native kernels see the 3 coarsest levels' rows only;
    features, encoding Jacobian and their first and second derivatives equal the torch
    reference's masked levels (zeros and no table gradient above level 3)."""
    enc = _encoding(d, "Smoothstep").to(device)
    enc.set_active_levels(3)
    assert enc.layout.first(3).n_params_rows < enc.layout.n_params_rows
    x = _points(d).to(device)

    def run(backend):
        enc.backend = backend
        enc.table.grad = None
        xx = x.clone().requires_grad_(True)
        y = enc(xx)
        feats, jac = enc.forward_with_jacobian(xx)
        w = torch.randn(y.shape, generator=torch.Generator().manual_seed(1), dtype=y.dtype).to(y.device)
        (gx,) = torch.autograd.grad((y * w).sum(), xx, create_graph=True)
        ((gx**2).sum() + (feats * w).sum() + jac.square().sum()).backward()
        return y.detach(), feats.detach(), jac.detach(), gx.detach(), xx.grad, enc.table.grad.clone()

    ref, nat = run("torch"), run("native")
    for a, b, name in zip(ref, nat, ["values", "features", "Jacobian", "d/dx", "d2/dx2", "d/dtable"]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-11, msg=name)
    off = enc.config.n_features_per_level * 3
    assert nat[0][:, off:].abs().max() == 0 and nat[5][enc.layout.first(3).n_params_rows :].abs().max() == 0


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("interp", ["Linear", "Smoothstep"])
def test_gradcheck_and_gradgradcheck(d, interp, device):
    enc = _encoding(d, interp).to(device)
    x = torch.rand(5, d, generator=torch.Generator().manual_seed(2), dtype=torch.float64).to(device) * 0.8 + 0.1
    x.requires_grad_(True)
    table = enc.table.detach().clone().requires_grad_(True)

    def f(x, table):
        return native.hashgrid_encode(x, table, enc.layout, interp == "Smoothstep")

    check_derivatives(f, (x, table))


def test_float32_matches_reference():
    enc = _encoding(3, "Linear", torch.float32)
    x = _points(3, 4096, dtype=torch.float32)
    ref = hashgrid_encode_torch(x, enc.table, enc.indexer(), False)
    # the native build may fuse scale * x + 0.5 into one FMA (tcnn's own formula); at the
    # finest level one ulp of the float32 position is ~8e-6 of a cell
    torch.testing.assert_close(native.hashgrid_encode(x, enc.table, enc.layout, False), ref, rtol=1e-4, atol=1e-5)


def test_gradicon_step_matches_reference(device):
    cfg = FieldConfig(encoding=HashGridConfig(**CFG), hidden_width=16, backend="torch")
    torch.manual_seed(0)
    fa, fb = NeuralField(3, cfg).double().to(device), NeuralField(3, cfg).double().to(device)
    for f in (fa, fb):
        torch.nn.init.uniform_(f.encoding.table, -0.1, 0.1)
        torch.nn.init.normal_(f.mlp[-1].weight, std=0.1)
    u = _points(3, 200).to(device)

    def grads(backend):
        for f in (fa, fb):
            f.encoding.backend = backend
            f.zero_grad()
        loss = regularizers.gradicon(fa, fb, u)
        loss.backward()
        params = list(fa.parameters()) + list(fb.parameters())
        return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    loss_ref, g_ref = grads("torch")
    loss_nat, g_nat = grads("native")
    torch.testing.assert_close(loss_nat, loss_ref, rtol=1e-10, atol=0)
    for a, b in zip(g_ref, g_nat):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("d", [2, 3])
def test_fused_warp_matches_grid_sample(d, device):
    shape = (7, 9, 8)[:d]
    image = torch.rand(shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(device)
    g = torch.Generator().manual_seed(4)
    upper = torch.tensor(shape, dtype=torch.float64) - 1
    pts = torch.rand(300, d, generator=g, dtype=torch.float64) * (upper + 3) - 1.5  # some outside
    pts[:20] = torch.randint(0, 6, (20, d), generator=g).double()  # voxel centers exactly
    pts = pts.to(device)
    a = pts.clone().requires_grad_(True)
    b = pts.clone().requires_grad_(True)
    va, vb = sample_image(image, a), native.warp(image, b)
    torch.testing.assert_close(vb, va)
    torch.testing.assert_close(native.sample_values(image, pts), vb.detach(), rtol=0, atol=0)  # values alone
    w = torch.randn(300, generator=g, dtype=torch.float64).to(device)
    (ga,) = torch.autograd.grad((va * w).sum(), a)
    (gb,) = torch.autograd.grad((vb * w).sum(), b)
    inside_cells = ((pts - pts.floor()) > 1e-9).all(1)  # grid_sample's gradient at a vertex is one-sided
    torch.testing.assert_close(gb[inside_cells], ga[inside_cells])
    assert torch.autograd.gradcheck(lambda p: native.warp(image, p), (b[inside_cells][:20].detach().requires_grad_(),))


@pytest.mark.parametrize("d", [2, 3])
def test_fused_warp_of_channels_matches_grid_sample(d, device):
    """A channel-last volume (*spatial, C), e.g. MIND descriptors: values (N, C) and the points'
    gradient of any weighted sum, as ``sample_image`` of the channel-first volume gives them."""
    shape, channels = (7, 9, 8)[:d], 5
    image = torch.rand((*shape, channels), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    image = image.to(device)
    g = torch.Generator().manual_seed(6)
    upper = torch.tensor(shape, dtype=torch.float64) - 1
    pts = (torch.rand(300, d, generator=g, dtype=torch.float64) * (upper + 3) - 1.5).to(device)  # some outside
    a = pts.clone().requires_grad_(True)
    b = pts.clone().requires_grad_(True)
    va, vb = sample_image(image.movedim(-1, 0), a), native.warp(image, b)
    assert vb.shape == (300, channels)
    torch.testing.assert_close(vb, va)
    torch.testing.assert_close(native.sample_values(image, pts), vb.detach(), rtol=0, atol=0)
    w = torch.randn(300, channels, generator=g, dtype=torch.float64).to(device)
    (ga,) = torch.autograd.grad((va * w).sum(), a)
    (gb,) = torch.autograd.grad((vb * w).sum(), b)
    torch.testing.assert_close(gb, ga)
    inside = b[((pts > 0) & (pts < upper.to(device) - 1)).all(1)][:20].detach().requires_grad_()
    assert torch.autograd.gradcheck(lambda p: native.warp(image, p), (inside,))


@pytest.mark.parametrize("backend", ["torch", "native"])
@pytest.mark.parametrize(
    "activation, layers", [("relu", 2), ("silu", 2), ("tanh", 2), ("softplus", 2), ("relu", 1), ("relu", 0)]
)
def test_analytic_gradicon_equals_autograd(backend, activation, layers, device):
    if backend == "torch" and device != "cpu":
        pytest.skip("the reference has no device-specific kernels")
    cfg = FieldConfig(
        encoding=HashGridConfig(**CFG, interpolation="Smoothstep"),
        hidden_width=16,
        hidden_layers=layers,  # the push-forward through 0, 1 and several hidden layers
        activation=activation,
        backend="torch",
    )
    torch.manual_seed(0)
    fa, fb = NeuralField(3, cfg).double().to(device), NeuralField(3, cfg).double().to(device)
    for f in (fa, fb):
        f.encoding.backend = backend
        torch.nn.init.uniform_(f.encoding.table, -0.1, 0.1)
        torch.nn.init.normal_(f.mlp[-1].weight, std=0.1)
    fa.encoding.set_active_levels(4)  # masked levels must behave the same
    u = _points(3, 150)
    u[5] = torch.tensor([1.2, -0.1, 0.5], dtype=torch.float64)  # outside the unit cube: clamped
    u = u.to(device)

    def run(fn):
        for f in (fa, fb):
            f.zero_grad()
        loss = fn(fa, fb, u)
        loss.backward()
        params = list(fa.parameters()) + list(fb.parameters())
        return loss.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params]

    loss_a, grads_a = run(regularizers.gradicon)
    loss_b, grads_b = run(regularizers.gradicon_analytic)
    torch.testing.assert_close(loss_b, loss_a, rtol=1e-10, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(b, a, rtol=1e-8, atol=1e-12)


def test_encoding_jacobian_kernel_gradcheck(device):
    enc = _encoding(3, "Smoothstep").to(device)
    x = torch.rand(4, 3, generator=torch.Generator().manual_seed(5), dtype=torch.float64).to(device) * 0.8 + 0.1
    x.requires_grad_(True)
    table = enc.table.detach().clone().requires_grad_(True)
    check_derivatives(
        lambda x, t: native.hashgrid_encode_with_jacobian(x, t, enc.layout, True), (x, table), second_atol=None
    )


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("interp", ["Linear", "Smoothstep"])
def test_encoding_jacobian_kernels_match_reference(d, interp, device):
    """Forward (y, dy/dx) and its backward to x and the table against autograd on the reference."""
    enc = _encoding(d, interp).to(device)
    smooth = interp == "Smoothstep"
    x = _points(d, 48).to(device)
    g = torch.Generator().manual_seed(6)
    L = enc.table.new_empty(0)  # dtype/device template
    w_y = torch.randn(48, enc.n_output_dims, generator=g, dtype=torch.float64).to(L.device)
    w_j = torch.randn(48, enc.n_output_dims, d, generator=g, dtype=torch.float64).to(L.device)

    def reference(xx, table):
        y = hashgrid_encode_torch(xx, table, enc.indexer(), smooth)
        jac = torch.stack(
            [torch.autograd.grad(y[:, k].sum(), xx, create_graph=True)[0] for k in range(y.shape[1])], dim=1
        )
        return y, jac

    def run(fn):
        xx = x.clone().requires_grad_(True)
        table = enc.table.detach().clone().requires_grad_(True)
        y, jac = fn(xx, table)
        gx, gt = torch.autograd.grad((y * w_y).sum() + (jac * w_j).sum(), (xx, table))
        return y.detach(), jac.detach(), gx, gt

    ref = run(reference)
    nat = run(lambda xx, t: native.hashgrid_encode_with_jacobian(xx, t, enc.layout, smooth))
    for a, b, name in zip(ref, nat, ["values", "jacobian", "d/dx", "d/dtable"]):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-11, msg=name)


@pytest.mark.parametrize("threads", [1, 2, 8])
def test_encoding_jacobian_backward_gives_both_gradients_as_it_gives_each(threads):
    """The CPU twin computes both gradients (points and table) in one visit of each point
    and level where the levels outnumber the threads two to one, and in two passes
    otherwise: either way what it gives for one is what it gives for that one alone (float64)."""
    enc = _encoding(3, "Smoothstep")
    layout = enc.layout.first(enc.n_active)
    x = _points(3, 96)
    g = torch.Generator().manual_seed(7)
    lin = torch.eye(3, dtype=torch.float64) + 0.1 * torch.randn(3, 3, generator=g, dtype=torch.float64)
    table = enc.table.detach()
    feats, rows = native._mod(x).hashgrid_forward_jacobian(x, table, lin, 40, *native._layout_args(layout), True)
    gy, gd = (
        torch.randn(feats.shape, generator=g, dtype=torch.float64),
        torch.randn(rows.shape, generator=g, dtype=torch.float64),
    )

    def backward(need_x, need_table):
        return native._mod(x).hashgrid_jacobian_backward(
            gy, gd, x, table, lin, 40, *native._layout_args(layout), True, need_x, need_table
        )

    callers = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        both, x_only, table_only = backward(True, True), backward(True, False), backward(False, True)
    finally:
        torch.set_num_threads(callers)
    assert x_only[1] is None and table_only[0] is None  # undefined: not computed
    torch.testing.assert_close(both[0], x_only[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(both[1], table_only[1], rtol=1e-12, atol=1e-14)
    assert both[0].abs().sum() > 0 and both[1].abs().sum() > 0


def test_every_build_exposes_the_same_ops():
    """One op table (cuda_kernels/ops.h): CPU twin, CUDA sources compiled for emulation and, with a GPU, CUDA."""
    cpu = native.ops("cpu")
    assert "hashgrid_forward_jacobian" in cpu and "hashgrid_jacobian_backward" in cpu and "warp_forward" in cpu
    assert native.ops("emulated") == cpu
    if GPU_BUILD:
        assert native.ops("cuda") == cpu


def test_overlap_mutual_information_kernels_match_reference(device, monkeypatch):
    """``overlap_mi_forward`` / ``overlap_mi_backward`` against the op-by-op path of
    ``similarity.overlap_mi`` (float64): the value and the gradients in the warped sample and
    in the weights, a batch of pairs each with its own histogram and its own counted range,
    weights of 0 (outside the overlap, their values outside the counted range), of 1 and in
    between, and a row with nothing counted (value and gradients 0)."""
    from neuralreg.losses import similarity

    g = torch.Generator().manual_seed(1)
    b, n = 3, 900
    warped = torch.rand(b, n, generator=g, dtype=torch.float64)
    fixed = (warped + 0.3 * torch.rand(b, n, generator=g, dtype=torch.float64)) ** 2
    weight = torch.rand(b, n, generator=g, dtype=torch.float64).clamp(max=0.8) / 0.8  # a share at exactly 1
    weight[:, :100] = 0.0
    warped[:, :100] += 2.0  # outside the counted range: clamped to the edge bins
    weight[2] = 0.0  # no overlap at all
    results = []
    for path in ("native", "reference"):
        if path == "reference":
            monkeypatch.setattr(similarity, "_native_kernels", lambda x: None)
        else:
            assert similarity._native_kernels(warped.to(device)) is not None
        w = warped.to(device).requires_grad_(True)
        m = weight.to(device).requires_grad_(True)
        value = similarity.overlap_mi(w, fixed.to(device), m, bins=16)
        scaled = (value * torch.arange(1.0, b + 1, dtype=value.dtype, device=device)).sum()
        grads = torch.autograd.grad(scaled, (w, m))
        results.append((value.detach().cpu(), *(x.cpu() for x in grads)))
        monkeypatch.undo()
    for native_result, reference in zip(*results, strict=True):
        torch.testing.assert_close(native_result, reference, rtol=1e-9, atol=1e-12)
    value, g_w, g_m = results[0]
    assert value[2] == 0 and g_w[2].abs().max() == 0 and g_m[2].abs().max() == 0
    assert g_w[:2, 100:].abs().min(1).values.max() > 0 and g_m[:2].abs().max() > 0
    assert g_w[:2, :100].abs().max() == 0  # a point of weight 0 moves nothing in the histogram


@pytest.mark.parametrize("batch", [1, 2])
def test_mutual_information_kernels_match_reference(batch, device, monkeypatch):
    """``mi_forward`` / ``mi_backward`` against the written-out PyTorch path of
    ``similarity._MutualInformation`` (float64): the value and the warped sample's gradient,
    a batch of pairs each with its own histogram, values that tie with a bin's edge, and a
    constant fixed sample (its range floored at eps)."""
    from neuralreg.losses import similarity

    g = torch.Generator().manual_seed(0)
    warped = torch.rand(batch, 700, generator=g, dtype=torch.float64)
    warped[:, :50] = torch.linspace(0, 1, 30, dtype=torch.float64).repeat(2)[:50]  # on bin centres and edges
    fixed = (warped + 0.3 * torch.rand(batch, 700, generator=g, dtype=torch.float64)) ** 2
    if batch == 2:
        fixed[1] = 0.25  # one constant sample
    results = []
    for path in ("native", "reference"):
        if path == "reference":
            monkeypatch.setattr(similarity, "_native_kernels", lambda x: None)
        else:
            assert similarity._native_kernels(warped.to(device)) is not None
        w = warped.to(device).requires_grad_(True)
        value = similarity.mi(w, fixed.to(device))
        (grad,) = torch.autograd.grad((value * torch.arange(1.0, batch + 1, dtype=value.dtype, device=device)).sum(), w)
        results.append((value.detach().cpu(), grad.cpu()))
        monkeypatch.undo()
    (v_n, g_n), (v_r, g_r) = results
    torch.testing.assert_close(v_n, v_r, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(g_n, g_r, rtol=1e-8, atol=1e-12)
    assert g_n.abs().max() > 0
