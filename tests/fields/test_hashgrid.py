"""Hash-grid reference: tcnn formulas, derivatives to second order, backend interface."""

import itertools
import math

import numpy as np
import pytest
import torch

from neuralreg import HashGridConfig, HashGridEncoding
from neuralreg.fields.hashgrid import level_layout
from neuralreg.testing import check_derivatives

SMALL = HashGridConfig(n_levels=4, n_features_per_level=2, log2_hashmap_size=8, base_resolution=3, per_level_scale=2.0)


def test_layout_matches_tcnn_defaults():
    # tcnn's documented default: 16 levels, base 16, scale 2, T = 2^19; 3D
    cfg = HashGridConfig(n_levels=16, log2_hashmap_size=19, base_resolution=16, per_level_scale=2.0)
    lay = level_layout(cfg, 3)
    assert lay.resolutions[:3] == (16, 32, 64)  # 2^l * 16 - 1 -> ceil + 1
    assert lay.sizes[0] == 16**3 and lay.sizes[1] == 32**3
    assert lay.sizes[2] == 2**18 and not lay.hashed[2]  # 64^3 = 2^18 fits densely
    assert lay.hashed[3] and lay.sizes[3] == 2**19
    assert lay.offsets[1] == 16**3


def _tcnn_scalar(x, table, cfg, smooth):
    """An independent per-point evaluation written from tcnn's grid.h, in plain Python integers."""
    d = len(x)
    out = []
    offset = 0
    for level in range(cfg.n_levels):
        scale = float(np.float32(2.0 ** (level * np.float32(math.log2(cfg.per_level_scale)))) * cfg.base_resolution - 1)
        res = math.ceil(scale) + 1
        size = min(-(-(res**d) // 8) * 8, 2**cfg.log2_hashmap_size)
        pos = [scale * xi + 0.5 for xi in x]
        base = [math.floor(p) for p in pos]
        frac = [p - b for p, b in zip(pos, base)]
        if smooth:
            frac = [f * f * (3 - 2 * f) for f in frac]
        feat = np.zeros(cfg.n_features_per_level)
        for corner in itertools.product((0, 1), repeat=d):
            v = [(b + c) & 0xFFFFFFFF for b, c in zip(base, corner)]
            stride, idx, dim = 1, 0, 0
            while dim < d and stride <= size:
                idx += v[dim] * stride
                stride *= res
                dim += 1
            if size < stride:
                idx = 0
                for vi, prime in zip(v, (1, 2654435761, 805459861)):
                    idx ^= (vi * prime) & 0xFFFFFFFF
            w = 1.0
            for f, c in zip(frac, corner):
                w *= f if c else 1 - f
            feat += w * table[offset + idx % size]
        out.extend(feat)
        offset += size
    return np.array(out)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("interp", ["Linear", "Smoothstep"])
def test_reference_matches_independent_tcnn_formulas(dims, interp):
    cfg = HashGridConfig(
        n_levels=6,
        n_features_per_level=2,
        log2_hashmap_size=10,
        base_resolution=5,
        per_level_scale=1.7,
        interpolation=interp,
    )
    enc = HashGridEncoding(dims, cfg).double()
    torch.nn.init.uniform_(enc.table, -1, 1)
    assert any(enc.layout.hashed) and not all(enc.layout.hashed)  # both index paths exercised
    g = torch.Generator().manual_seed(0)
    x = torch.rand(40, dims, generator=g, dtype=torch.float64)
    x[0] = 0.0
    x[1] = 1.0  # top corner: vertex index == resolution, wraps via % size
    got = enc(x).detach().numpy()
    table = enc.table.detach().numpy()
    for i in range(x.shape[0]):
        want = _tcnn_scalar(x[i].tolist(), table, cfg, interp == "Smoothstep")
        np.testing.assert_allclose(got[i], want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dims", [2, 3])
@pytest.mark.parametrize("interp", ["Linear", "Smoothstep"])
def test_gradcheck_inputs_and_tables(dims, interp):
    cfg = HashGridConfig(**{**SMALL.__dict__, "interpolation": interp})
    enc = HashGridEncoding(dims, cfg).double()
    torch.nn.init.uniform_(enc.table, -1, 1)
    g = torch.Generator().manual_seed(1)
    # keep points away from cell faces, where linear interpolation has kinks
    x = (torch.rand(6, dims, generator=g, dtype=torch.float64) * 0.8 + 0.1).requires_grad_(True)
    table = enc.table.detach().clone().requires_grad_(True)

    def f(x, table):
        with torch.no_grad():
            enc.table.copy_(table)
        from neuralreg.fields.reference import hashgrid_encode_torch

        return hashgrid_encode_torch(x, table, enc.indexer(), interp == "Smoothstep")

    check_derivatives(f, (x, table))


def test_second_derivative_of_smoothstep_is_nonzero():
    enc = HashGridEncoding(3, HashGridConfig(**{**SMALL.__dict__, "interpolation": "Smoothstep"})).double()
    torch.nn.init.uniform_(enc.table, -1, 1)
    x = torch.rand(5, 3, dtype=torch.float64, requires_grad=True)
    y = enc(x)[:, 0].sum()
    (gx,) = torch.autograd.grad(y, x, create_graph=True)
    (hxx,) = torch.autograd.grad(gx[:, 0].sum(), x)
    assert hxx.abs().sum() > 0


def test_level_mask_switches_levels_off():
    enc = HashGridEncoding(2, SMALL)
    torch.nn.init.uniform_(enc.table, -1, 1)
    enc.set_active_levels(2)
    x = torch.rand(10, 2, requires_grad=True)
    y = enc(x)
    assert torch.all(y[:, 4:] == 0) and torch.any(y[:, :4] != 0)
    y.sum().backward()
    fine_rows = enc.layout.offsets[2]
    assert torch.all(enc.table.grad[fine_rows:] == 0)


def test_inputs_outside_unit_cube_are_clamped():
    enc = HashGridEncoding(2, SMALL)
    torch.nn.init.uniform_(enc.table, -1, 1)
    x = torch.tensor([[1.3, -0.2], [1.0, 0.0]])
    y = enc(x)
    torch.testing.assert_close(y[0], y[1])


def test_bad_config_rejected():
    with pytest.raises(ValueError):
        HashGridConfig(interpolation="Cubic")
    with pytest.raises(ValueError):
        HashGridEncoding(4, SMALL)


def test_tcnn_config_keys():
    d = SMALL.to_tcnn()
    assert d["otype"] == "HashGrid" and d["log2_hashmap_size"] == 8 and d["interpolation"] == "Linear"
