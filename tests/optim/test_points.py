"""Point sampling: uniform, inside masks, and edge-weighted."""

import warnings

import pytest
import torch

from neuralreg.optim.points import VoxelSampler, edge_weights


def test_uniform_points_fill_the_grid():
    s = VoxelSampler((5, 7, 9), generator=torch.Generator().manual_seed(0))
    p = s.sample(20000)
    assert p.shape == (20000, 3)
    assert (p.min(0).values >= 0).all() and (p.max(0).values <= torch.tensor([4.0, 6.0, 8.0])).all()
    assert p.mean(0) == pytest.approx(torch.tensor([2.0, 3.0, 4.0]), abs=0.1)


def test_weighted_points_follow_the_weights_within_their_voxels():
    w = torch.zeros(10, 10)
    w[2, 3], w[7, 8] = 1.0, 3.0
    s = VoxelSampler(w.shape, generator=torch.Generator().manual_seed(0), weights=w, weighted_fraction=1.0)
    p = s.sample(40000)
    near_a = ((p - torch.tensor([2.0, 3.0])).abs() <= 0.5).all(1)
    near_b = ((p - torch.tensor([7.0, 8.0])).abs() <= 0.5).all(1)
    assert bool((near_a | near_b).all())
    assert near_b.float().mean() == pytest.approx(0.75, abs=0.01)
    # the regularizer asks for uniform points from the same sampler
    u = s.sample(40000, weighted=False)
    assert near_a.float().mean() > 0.2 and ((u - torch.tensor([2.0, 3.0])).abs() <= 0.5).all(1).float().mean() < 0.03


def test_weighted_fraction_mixes_and_mask_limits_the_weights():
    w = torch.ones(20, 20)
    mask = torch.zeros(20, 20, dtype=torch.bool)
    mask[:10] = True
    w[15, 15] = 1e6  # outside the mask: never drawn
    s = VoxelSampler(w.shape, mask, torch.Generator().manual_seed(1), weights=w, weighted_fraction=0.5)
    p = s.sample(10000)
    assert (p[:, 0] <= 9.5).all()
    w[4, 4] = 1e6  # inside the mask: the weighted half lands on it, the uniform half spreads
    s = VoxelSampler(w.shape, mask, torch.Generator().manual_seed(1), weights=w, weighted_fraction=0.5)
    on_peak = ((s.sample(10000) - torch.tensor([4.0, 4.0])).abs() <= 0.5).all(1).float().mean()
    assert float(on_peak) == pytest.approx(0.5 + 0.5 / 200, abs=0.02)
    bad = VoxelSampler(w.shape, weights=torch.zeros(20, 20), weighted_fraction=0.5)
    assert bad.weighted_fraction == 0.0 and bad.sample(10).shape == (10, 2)  # nothing to weight by
    with pytest.raises(ValueError):
        VoxelSampler(w.shape, weights=w, weighted_fraction=1.5)


def test_weighted_windows_centre_on_edges():
    img = torch.zeros(32, 32, 32)
    img[:, :, 16:] = 1.0  # one edge plane between x = 15 and 16
    w = edge_weights(img)
    assert float(w[5, 5, 15]) == pytest.approx(0.5) and float(w[5, 5, 5]) == 0.0
    s = VoxelSampler(img.shape, generator=torch.Generator().manual_seed(2), weights=w, weighted_fraction=1.0)
    centres = s.sample_windows(500, 4, 0.0).reshape(500, 4, 3)[:, 0]
    assert bool(((centres[:, 2] >= 14.5) & (centres[:, 2] <= 16.5)).all())


def test_config_rejects_a_bad_edge_fraction():
    from neuralreg.config import RegistrationConfig

    assert RegistrationConfig().edge_fraction == 1.0
    with pytest.raises(ValueError, match="edge_fraction"):
        RegistrationConfig(edge_fraction=-0.1)


def test_edge_power_flattens_the_weights_toward_weak_edges():
    img = torch.zeros(8, 40)
    img[:, 10:] = 0.1  # a weak edge between columns 9 and 10
    img[:, 30:] = 1.1  # a ten times stronger one between 29 and 30
    for power, weak_share in ((1.0, 1 / 11), (0.5, 1 / (1 + 10**0.5))):
        w = edge_weights(img, power)
        assert float(w[3, 29] / w[3, 9]) == pytest.approx(10.0**power, rel=1e-5)
        s = VoxelSampler(img.shape, generator=torch.Generator().manual_seed(3), weights=w, weighted_fraction=1.0)
        cols = s.sample(40000)[:, 1]
        assert float((cols < 20).float().mean()) == pytest.approx(weak_share, abs=0.01)
    assert torch.equal(edge_weights(img), edge_weights(img, 1.0))


def test_config_rejects_a_bad_edge_power():
    from neuralreg.config import RegistrationConfig

    with pytest.raises(ValueError, match="edge_power"):
        RegistrationConfig(edge_power=0.0)


@pytest.mark.parametrize(
    "stage_points, affine_points, affine, fields",
    [
        ((0.25, 0.5, 1.0), 256, [256] * 8, [256] * 4 + [512] * 4 + [1024] * 8),
        # the defaults: all the points in every stage, half of them in the affine fit
        (None, None, [512] * 8, [1024] * 4 + [1024] * 4 + [1024] * 8),
    ],
)
def test_each_stage_and_the_affine_fit_draw_their_configured_points(stage_points, affine_points, affine, fields):
    from neuralreg import RegistrationConfig
    from neuralreg.losses import SIMILARITIES
    from neuralreg.optim.registration import PairRegistration
    from neuralreg.phantoms import triangles_pair

    drawn = []

    def counted(loss):
        def spy(warped, target):
            drawn.append(warped.numel())  # points (lncc: windows x points per window)
            return loss(warped, target)

        return spy

    pair = triangles_pair(size=32)
    cfg = RegistrationConfig(
        steps=8,
        points=1024,
        stage_points=stage_points,
        stage_fractions=(0.25, 0.25, 0.5),
        affine_steps=4,
        affine_points=affine_points,
        affine_init="centroid",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 8 steps: the self-check's verdict is not the point here
        similarities = {name: counted(loss) for name, loss in SIMILARITIES.items()}
        PairRegistration(pair["moving"], pair["fixed"], cfg, run={"threads": 1}, similarities=similarities).run()
    # affine steps (2 terms each) first, then the fields' stages: 2 + 2 + 4 steps, 2 terms each
    assert drawn == affine + fields


def test_config_rejects_bad_point_shares():
    from neuralreg.config import RegistrationConfig, affine_fit_points, stage_point_shares

    assert RegistrationConfig().stage_points is None and RegistrationConfig().affine_points is None
    assert stage_point_shares(RegistrationConfig()) == (1.0, 1.0, 1.0)
    one = RegistrationConfig(pyramid=(1,), stage_fractions=(1,))  # any pyramid by default
    assert one.stage_points is None and stage_point_shares(one) == (1.0,)
    assert stage_point_shares(RegistrationConfig(stage_points=(1, 1, 1))) == (1.0, 1.0, 1.0)
    assert affine_fit_points(RegistrationConfig(), 16384) == 8192
    assert affine_fit_points(RegistrationConfig(affine_points=100), 16384) == 100
    with pytest.raises(ValueError, match="stage_points"):
        RegistrationConfig(stage_points=(0.5, 1.0))  # three stages
    with pytest.raises(ValueError, match="stage_points"):
        RegistrationConfig(stage_points=(0.0, 0.5, 1.0))
    with pytest.raises(ValueError, match="affine_points"):
        RegistrationConfig(affine_points=4)


def test_default_points_follow_the_fixed_image_size():
    """points=None: one per voxels_per_point fixed voxels within [4096, 16384]; an explicit count is kept."""
    from neuralreg.config import RegistrationConfig, similarity_points

    auto = RegistrationConfig()
    assert auto.points is None
    assert similarity_points(auto, (80, 192, 192)) == 16384  # OAI knee grid
    assert similarity_points(auto, (120, 120, 90)) == 7200  # IXI head
    assert similarity_points(auto, (32, 32, 32)) == 4096
    assert similarity_points(auto, (160, 384, 384)) == 16384
    assert similarity_points(RegistrationConfig(voxels_per_point=90.0), (120, 120, 90)) == 14400
    assert similarity_points(RegistrationConfig(points=1000), (120, 120, 90)) == 1000
    with pytest.raises(ValueError, match="voxels_per_point"):
        RegistrationConfig(voxels_per_point=0)


def test_default_regularizer_points_follow_the_similarity_points():
    """regularizer_points=None: one per 8 similarity points (the knee grid keeps 2048); an explicit count is kept."""
    from neuralreg.config import RegistrationConfig, regularizer_points, similarity_points

    auto = RegistrationConfig()
    assert regularizer_points(auto, similarity_points(auto, (80, 192, 192))) == 2048
    assert regularizer_points(auto, similarity_points(auto, (120, 120, 90))) == 900
    assert regularizer_points(RegistrationConfig(regularizer_points=300), 16384) == 300
    with pytest.raises(ValueError, match="regularizer_points"):
        RegistrationConfig(regularizer_points=0)


def _limb(shape=(40, 60, 60), radius=20.0, shell=(8.0, 9.0), hole=7.0):
    """A cylinder along axis 0 (1 mm voxels) leaving the grid at both ends, bright (0.8), with a
    dark 1 mm shell inside it (cortical bone) and a dark ball of radius ``hole`` at the centre
    (a ventricle, wider than the closing bridges), in faint air (0.02); and each voxel's depth (mm)."""
    from neuralreg import Image

    x, y, z = torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij")
    r = torch.sqrt((y - (shape[1] - 1) / 2) ** 2 + (z - (shape[2] - 1) / 2) ** 2)
    data = torch.where(r <= radius, 0.8, 0.02)
    data = torch.where((r >= shell[0]) & (r <= shell[1]), 0.0, data)
    data = torch.where(r**2 + (x - (shape[0] - 1) / 2) ** 2 <= hole**2, 0.0, data)
    return Image.from_array(data), radius - r


def test_interior_mask_keeps_away_from_the_outline_not_the_grid_edge():
    """Interior: deeper than depth_mm from the outline (a box: up to depth x sqrt(2) across a
    cylinder, plus the ~3 mm grid it is found on); the dark shell and the dark ball inside do
    not cut it, and the cylinder's ends, where it leaves the field of view, are not an outline."""
    from neuralreg.optim.points import interior_mask

    image, depth = _limb()
    inside = interior_mask(image, 6.0)
    assert inside.shape == image.shape and inside.dtype == torch.bool
    assert bool(inside[depth > 6.0 * 2**0.5 + 3.0].all())  # deep voxels, the shell's and the ball's included
    assert not bool(inside[depth < 6.0 - 3.0].any())  # near the outline, and all the air
    assert bool(inside[0][depth[0] > 12.0].all()) and bool(inside[-1][depth[-1] > 12.0].all())
    assert 0.05 < float(inside.float().mean()) < 0.5


def test_no_interior_without_depth_or_room():
    """depth 0, an object too small for the depth, or a body filling the grid: no interior to draw from."""
    from neuralreg import Image
    from neuralreg.optim.alignment import interior_within
    from neuralreg.optim.points import interior_mask

    image, _ = _limb()
    assert interior_mask(image, 0.0) is None
    assert interior_mask(_limb(radius=5.0, shell=(0, -1), hole=0)[0], 6.0) is None
    full = Image.from_array(0.5 + 0.1 * torch.rand(20, 30, 30, generator=torch.Generator().manual_seed(0)))
    assert interior_within(full, None, 6.0) is None  # (nearly) the whole grid: the fits draw from everywhere
    mask = image.with_data((torch.arange(60) < 30).float().expand(40, 60, 60).clone())  # axis 2 < 30
    within = interior_within(image, mask, 6.0)  # the interior within a mask given
    assert within is not mask and not bool(within.data[..., 30:].any()) and bool(within.data[..., :30].any())


@pytest.mark.parametrize("shape", [(7,), (5, 9), (4, 6, 11), (80, 192, 192)])
def test_unravel_equals_torch_unravel_index(shape):
    from neuralreg.optim.points import _unravel

    n = 1
    for s in shape:
        n *= s
    picks = torch.randint(0, n, (500,), generator=torch.Generator().manual_seed(0))
    flat = torch.cat([torch.tensor([0, n - 1]), picks])
    assert torch.equal(_unravel(flat, shape), torch.stack(torch.unravel_index(flat, shape), dim=1))


def test_the_stages_after_the_first_fit_the_fine_similarity():
    """``fine_similarity``: the coarsest stage fits ``similarity`` (local NCC's windows), the later
    ones mutual information over plain points; the affine fits keep ``affine_similarity``."""
    from neuralreg import RegistrationConfig
    from neuralreg.losses import SIMILARITIES
    from neuralreg.optim.registration import PairRegistration
    from neuralreg.phantoms import triangles_pair

    called = []

    def named(name, loss):
        def spy(warped, target):
            called.append((name, tuple(warped.shape)))
            return loss(warped, target)

        return spy

    pair = triangles_pair(size=32)
    cfg = RegistrationConfig(
        steps=8, points=1024, affine_steps=2, affine_init="centroid", affine_similarity="ncc", fine_similarity="mi"
    )
    similarities = {name: named(name, loss) for name, loss in SIMILARITIES.items()}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        PairRegistration(pair["moving"], pair["fixed"], cfg, run={"threads": 1}, similarities=similarities).run()
    # 2 affine steps, then stages of 2, 2 and 4 steps; two terms a step
    assert called == [("ncc", (512,))] * 4 + [("lncc", (32, 32))] * 4 + [("mi", (1024,))] * 12


def test_field_of_view_is_the_image_less_its_zero_padding():
    """A scan cropped by its field of view (a block at the minimum) loses that block; dark
    voxels scattered in the data (noise clipped to the minimum) stay; 2D and 3D."""
    import numpy as np

    from neuralreg.geometry.image import Image
    from neuralreg.optim.points import field_of_view

    g = torch.Generator().manual_seed(0)
    for shape in ((20, 30, 30), (40, 50)):
        x = (torch.rand(shape, generator=g) - 0.1).clamp(min=0)  # a tenth of the voxels at 0, scattered
        x[:, :8] = 0  # the padding: 8 of 30 (50) columns
        fov = field_of_view(Image(x, np.eye(len(shape) + 1)))
        assert fov.dtype == torch.float32 and fov.shape == x.shape
        assert bool((fov[:, :8] == 0).all())
        assert bool((fov[:, 8:] == 1).all())  # the scattered zeros count as data


def test_middle_stages_draw_their_own_edge_share():
    """middle_edge_fraction sets the edge share of the pyramid stages between the first and
    the last (uniform points by default); the first and the last keep edge_fraction; None
    is edge_fraction everywhere; out of [0, 1] is a ConfigError naming the key."""
    from neuralreg import RegistrationConfig
    from neuralreg.config import stage_edge_fraction
    from neuralreg.optim.registration import PairRegistration
    from neuralreg.phantoms import triangles_pair

    pair = triangles_pair(size=32)

    def shares(**keys):
        cfg = RegistrationConfig(affine_steps=0, **keys)
        reg = PairRegistration(pair["moving"], pair["fixed"], cfg, run={"threads": 1})
        reg.make_fields()
        reg.align()
        stages = [reg.field_stage(s) for s in range(len(cfg.pyramid))]
        return [(s.moving_sampler.weighted_fraction, s.fixed_sampler.weighted_fraction) for s in stages]

    assert RegistrationConfig().middle_edge_fraction == 0.0
    assert shares() == [(1.0, 1.0), (0.0, 0.0), (1.0, 1.0)]  # the drawn samplers, not only the rule
    assert shares(middle_edge_fraction=0.25, edge_fraction=0.5) == [(0.5, 0.5), (0.25, 0.25), (0.5, 0.5)]
    assert shares(middle_edge_fraction=None, edge_fraction=0.5) == [(0.5, 0.5)] * 3
    four = RegistrationConfig(pyramid=(8, 4, 2, 1), stage_fractions=(0.25,) * 4)
    assert [stage_edge_fraction(four, s) for s in range(4)] == [1.0, 0.0, 0.0, 1.0]
    two = RegistrationConfig(pyramid=(2, 1), stage_fractions=(0.5, 0.5))  # no middle stage
    assert [stage_edge_fraction(two, s) for s in range(2)] == [1.0, 1.0]
    with pytest.raises(ValueError, match="middle_edge_fraction"):
        RegistrationConfig(middle_edge_fraction=1.5)


def test_draws_made_at_once_hand_out_each_calls_mix_and_windows():
    """A sampler that draws for several calls at once (``draws_at_once``, as the fields'
    stages do) hands out one call's share at a time: each call gets its own n points with
    its weighted share first, each window stays within its side, the pool is drawn anew
    when handed out, and one call at a time is the single draw bit for bit."""
    w = torch.zeros(20, 20)
    w[4, 4] = 1.0  # the weighted share lands on this voxel, the uniform share spreads
    peak = torch.tensor([4.0, 4.0])

    def sampler(at_once, seed=1):
        return VoxelSampler(
            w.shape,
            generator=torch.Generator().manual_seed(seed),
            weights=w,
            weighted_fraction=0.5,
            draws_at_once=at_once,
        )

    s = sampler(4)
    calls = [s.sample(1000) for _ in range(10)]  # two pools and a half
    for p in calls:
        on_peak = ((p - peak).abs() <= 0.5).all(1)
        assert p.shape == (1000, 2) and bool(on_peak[:500].all())
        assert float(on_peak[500:].float().mean()) < 0.02  # the uniform half, not the peak
    assert len({tuple(p[0].tolist()) for p in calls}) == 10  # every call its own points
    windows = [s.sample_windows(50, 8, 3.0).reshape(50, 8, 2) for _ in range(5)]
    for win in windows:
        assert float((win.amax(1) - win.amin(1)).max()) <= 3.0
    assert not torch.equal(windows[0], windows[1])
    one, plain = sampler(1, seed=7), sampler(1, seed=7)
    assert torch.equal(one.sample(300), plain.sample(300))
    with pytest.raises(ValueError, match="draws_at_once"):
        sampler(0)


def test_fields_stages_draw_for_several_steps_at_once():
    """The fields' stages draw their points for ``FIELD_DRAWS_AT_ONCE`` steps at a time; the
    probes and the affine fits draw step by step."""
    from neuralreg import RegistrationConfig
    from neuralreg.optim.registration import PairRegistration
    from neuralreg.optim.stage import FIELD_DRAWS_AT_ONCE
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=(16, 32, 32))
    reg = PairRegistration(pair["moving"], pair["fixed"], RegistrationConfig(affine_steps=0), run={"progress": False})
    reg.make_fields()
    reg.align()
    assert FIELD_DRAWS_AT_ONCE > 1
    assert {reg.field_stage(s).fixed_sampler.draws_at_once for s in range(3)} == {FIELD_DRAWS_AT_ONCE}
    assert reg.pair.stage(4, torch.Generator(), 100).fixed_sampler.draws_at_once == 1


def _fields_away_from_identity(cfg, similarities=None):
    """A ``PairRegistration`` of a small knee phantom pair, its global part aligned, its maps
    made and both fields' last layers drawn away from zero (every layer's gradient counts)."""
    from neuralreg.fields.affine import ComposedMap
    from neuralreg.optim.registration import PairRegistration
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=(16, 32, 32))
    reg = PairRegistration(pair["moving"], pair["fixed"], cfg, run={"progress": False}, similarities=similarities)
    reg.make_fields()
    reg.align()
    reg.maps = (ComposedMap(reg.phi_ab, reg.affine, False), ComposedMap(reg.phi_ba, reg.affine, True))
    with torch.no_grad():
        for field in (reg.phi_ab, reg.phi_ba):
            field.mlp[-1].weight.normal_(0.0, 0.01, generator=torch.Generator().manual_seed(5))
    return reg


@pytest.mark.parametrize("similarity", ["lncc", "mi", "custom"])
def test_both_directions_in_one_similarity_call_are_the_two_calls(similarity):
    """A field step's two similarity terms: a batched similarity sees both directions as one
    batch of two, with the points two calls would draw, the same losses and gradients (to
    rounding); a similarity of a run's own table that is not batched is called twice."""
    from neuralreg import RegistrationConfig
    from neuralreg.losses import SIMILARITIES

    calls = []

    def custom(warped, fixed):  # not in BATCHED: one direction a call
        calls.append(warped.shape)
        return SIMILARITIES["mse"](warped, fixed)

    table = {**SIMILARITIES, "custom": custom}
    cfg = RegistrationConfig(affine_steps=0, similarity="lncc" if similarity == "lncc" else "mse")
    reg = _fields_away_from_identity(cfg, table)
    results = []
    for together in (True, False):
        stage = reg.pair.stage(2, torch.Generator().manual_seed(3), 512, edge_fraction=0.5)
        map_ab, map_ba = reg.maps
        if together:
            terms = stage.similarity_both_ways(map_ab, map_ba, similarity)
        else:
            terms = (
                stage.similarity(map_ab, "moving", "fixed", similarity),
                stage.similarity(map_ba, "fixed", "moving", similarity),
            )
        params = list(reg.phi_ab.parameters()) + list(reg.phi_ba.parameters())
        grads = torch.autograd.grad(terms[0] + 2 * terms[1], params, allow_unused=True)
        results.append((torch.stack(terms).detach(), grads))
    (values, grads), (values_apart, grads_apart) = results
    torch.testing.assert_close(values, values_apart, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads, grads_apart, strict=True):
        if a is not None or b is not None:
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
    if similarity == "custom":
        assert len(calls) == 4  # two a step, both ways


@pytest.mark.parametrize("similarity", ["lncc", "mi"])
def test_a_steps_terms_with_the_similarity_in_gradicons_passes_are_the_separate_ones(similarity):
    """``Stage.terms`` (three map passes, the similarity's points in GradICON's) draws the
    same points as ``similarity_both_ways`` then ``regularizer`` (five passes) and gives the
    same three terms and gradients, rounding apart."""
    from neuralreg import RegistrationConfig

    reg = _fields_away_from_identity(RegistrationConfig(affine_steps=0))
    params = list(reg.phi_ab.parameters()) + list(reg.phi_ba.parameters())
    results = []
    for folded in (True, False):
        stage = reg.pair.stage(2, torch.Generator().manual_seed(3), 512, edge_fraction=0.5)
        map_ab, map_ba = reg.maps
        if folded:
            terms = stage.terms(map_ab, map_ba, similarity, 256)
        else:
            terms = (*stage.similarity_both_ways(map_ab, map_ba, similarity), stage.regularizer(map_ab, map_ba, 256))
        grads = torch.autograd.grad(terms[0] + 2 * terms[1] + 3 * terms[2], params)
        results.append((torch.stack(terms).detach(), grads))
    (values, grads), (values_apart, grads_apart) = results
    torch.testing.assert_close(values, values_apart, rtol=1e-5, atol=1e-7)
    assert values[2] > 0  # GradICON of fields away from the identity
    for a, b in zip(grads, grads_apart, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)
