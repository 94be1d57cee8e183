"""MIND-SSC descriptors and the similarities that read them: what they are invariant to, what
they follow, their values and gradients, and a registration across contrasts."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from knee_poses import CONFIG

from neuralreg import RegistrationConfig, RegistrationWarning, register_pair
from neuralreg.losses import BATCHED, DESCRIPTORS, SIMILARITIES
from neuralreg.losses.descriptors import MIND_WEIGHT, box_sum, intensity_and_mind_ssc, mind, mind_mi, mind_ssc
from neuralreg.losses.similarity import mi
from neuralreg.metrics import dice


def _smooth(shape, seed=0) -> torch.Tensor:
    """Random structure at a few voxels' scale."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand((1, 1, *shape), generator=g)
    pool = F.avg_pool3d if len(shape) == 3 else F.avg_pool2d
    return pool(x, 3, stride=1, padding=1, count_include_pad=False)[0, 0]


@pytest.mark.parametrize("shape, channels", [((10, 12, 28), 12), ((20, 28), 4)])
def test_mind_ssc_describes_structure_not_intensity(shape, channels):
    """(C, *shape) in (0, 1], 1 on each voxel's most alike pair; the same for any linear change
    of the intensities, inverted contrast included; it moves with the structure."""
    x = _smooth(shape)
    m = mind_ssc(x)
    assert m.shape == (channels, *shape)
    assert float(m.min()) > 0 and torch.allclose(m.max(0).values, torch.ones(shape))
    for scale, offset in ((3.0, 1.0), (-2.0, 5.0)):
        torch.testing.assert_close(mind_ssc(scale * x + offset), m, atol=2e-5, rtol=0)
    # a structure moved by 3 voxels along the last axis has its descriptors moved with it
    # (away from the borders, which are extended by their values)
    moved = mind_ssc(torch.roll(x, 3, dims=-1))
    inner = (..., slice(8, -8))
    torch.testing.assert_close(moved[inner], torch.roll(m, 3, dims=-1)[inner], atol=1e-4, rtol=0)
    assert not torch.allclose(moved[inner], m[inner], atol=1e-2)


@pytest.mark.parametrize(
    "shape, radius", [((2, 9, 11, 13), 1), ((3, 7, 8, 10), 2), ((2, 12, 15), 1), ((1, 6, 9), 2), ((1, 2, 9), 3)]
)
def test_box_sums_are_the_pooled_means_of_the_border_extended_volume(shape, radius):
    """Axis by axis, the box's size times ``avg_pool`` of the replicate-padded volume (the
    definition), float64 to rounding; 2D and 3D, boxes wider than one voxel's neighbours and
    axes shorter than the box."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(shape, generator=g, dtype=torch.float64)
    d = len(shape) - 1
    pool = F.avg_pool3d if d == 3 else F.avg_pool2d
    expected = pool(F.pad(x[None], (radius,) * (2 * d), mode="replicate"), 2 * radius + 1, stride=1)[0]
    torch.testing.assert_close(box_sum(x, radius, d) / (2 * radius + 1) ** d, expected, atol=1e-14, rtol=0)


def test_mind_ssc_stays_on_the_images_device():
    """The descriptors are made where the image lies (a CUDA image's on the GPU): checked on the
    meta device, which refuses any copy to another device as CUDA does."""
    m = mind_ssc(torch.empty(6, 7, 8, device="meta"))
    assert m.device.type == "meta" and m.shape == (12, 6, 7, 8)


def test_mind_ssc_rejects_other_dimensions():
    with pytest.raises(ValueError, match="2D or 3D"):
        mind_ssc(torch.rand(10))


def test_mind_and_mind_mi_values_and_gradients():
    """``mind`` is the mean squared difference over points and channels; ``mind_mi`` is mutual
    information of channel 0 plus ``MIND_WEIGHT`` times ``mind`` of the rest; both are
    registered as similarities that read descriptors (their batches: test_similarity.py)."""
    g = torch.Generator().manual_seed(1)
    warped = torch.rand(2, 300, 13, generator=g, dtype=torch.float64)
    fixed = torch.rand(2, 300, 13, generator=g, dtype=torch.float64)
    torch.testing.assert_close(mind(warped, fixed), ((warped - fixed) ** 2).mean((1, 2)))
    expected = mi(warped[..., 0], fixed[..., 0]) + MIND_WEIGHT * mind(warped[..., 1:], fixed[..., 1:])
    torch.testing.assert_close(mind_mi(warped, fixed), expected)
    assert {SIMILARITIES["mind"], SIMILARITIES["mind_mi"]} <= BATCHED
    assert DESCRIPTORS["mind"] is mind_ssc and DESCRIPTORS["mind_mi"] is intensity_and_mind_ssc
    image = _smooth((8, 9, 10))
    both = intensity_and_mind_ssc(image)
    assert torch.equal(both[0], image) and torch.equal(both[1:], mind_ssc(image))
    x = warped[0, :40, 1:].clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: mind(x, fixed[0, :40, 1:]), (x,))


def test_mind_mi_registers_a_knee_in_another_contrast():
    """The phantom knee against a deformed copy in another contrast (intensities cubed: the
    tissues keep their order, not their ratios), the later stages on ``mind_mi``: the bones and
    the cartilage land, no folds, and the result records what was fitted."""
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=(32, 48, 48))
    moving = pair["moving"].with_data(pair["moving"].data ** 3)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        config = RegistrationConfig(**CONFIG, fine_similarity="mind_mi")
        reg = register_pair(moving, pair["fixed"], config, run={"progress": False})
    warped = reg.warp(pair["moving_labels"], mode="nearest").data
    cartilage = [dice(w, pair["fixed_labels"].data, [2, 4])["mean"] for w in (pair["moving_labels"].data, warped)]
    assert cartilage[1] > cartilage[0] + 0.2, cartilage
    assert dice(warped, pair["fixed_labels"].data, [1, 3])["mean"] > 0.97
    assert reg.percent_folds() < 0.05
    assert reg.config.fine_similarity == "mind_mi"


@pytest.mark.parametrize("similarity", ["mind", "mind_mi"])
def test_descriptor_similarities_run_in_2d(similarity):
    """A 2D pair through every stage on a descriptor similarity: finite losses each step."""
    from neuralreg.phantoms import triangles_pair

    pair = triangles_pair(1, size=32)
    cfg = RegistrationConfig(
        steps=6, points=512, regularizer_points=128, similarity=similarity, fine_similarity=None, affine_steps=0
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RegistrationWarning)
        reg = register_pair(pair["moving"], pair["fixed"], cfg, run={"progress": False})
    assert len(reg.history) == 6 and all(torch.isfinite(torch.tensor(h["loss"])) for h in reg.history)


@pytest.mark.parametrize("similarity", ["mind", "mind_mi"])
def test_descriptor_similarities_read_alike_by_the_fused_warp_and_the_reference(similarity):
    """A stage reads the descriptors with the native fused warp (channel-last) or with
    ``sample_image``: the same points give the same similarity and the same gradient."""
    from neuralreg.geometry.coordinates import NormalizedBox
    from neuralreg.optim.stage import PairData, Stage
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=(24, 32, 32))
    moving, fixed = pair["moving"], pair["fixed"]
    cfg = RegistrationConfig(**CONFIG, fine_similarity=similarity)
    box = NormalizedBox.around([(moving.shape, moving.affine), (fixed.shape, fixed.affine)], cfg.margin)
    results = []
    for fused in (True, False):
        data = PairData(cfg, moving, fixed, None, None, box, torch.device("cpu"), fused, 2048)
        stage = Stage(data, 2, torch.Generator().manual_seed(0), 2048, inside_body=False)
        shift = torch.tensor([0.01, -0.02, 0.015], requires_grad=True)
        value = stage.similarity(lambda u, s=shift: u + s, "moving", "fixed", similarity)
        results.append((value.detach(), torch.autograd.grad(value, shift)[0]))
        assert stage.descriptors(similarity)["moving"].shape[:3] == stage.moving.shape  # channel-last
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(results[0][1], results[1][1], rtol=1e-4, atol=1e-6)
