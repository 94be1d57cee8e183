"""Similarity measures: mutual information against its definition and what it is for."""

import math

import pytest
import torch

from neuralreg.losses import SIMILARITIES, WINDOWED
from neuralreg.losses.similarity import joint_histogram, mi, normalized_mi


def _samples(n=20000, seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(n, generator=g, dtype=torch.float64)
    return a, g


def test_mi_gradients_match_finite_differences():
    """gradcheck in float64; the samples' range (which scales the bins, detached by design) is
    pinned by two constant anchors outside the checked values."""
    a, g = _samples(60)
    b = (a**2 + 0.05 * torch.randn(60, generator=g, dtype=torch.float64)).detach()
    anchors = torch.tensor([0.0, 1.0], dtype=torch.float64)
    x = (0.1 + 0.8 * a).requires_grad_(True)

    def f(x):
        return mi(torch.cat([x, anchors]), torch.cat([b, torch.tensor([-0.2, 1.3], dtype=torch.float64)]))

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_mi_does_not_care_which_tissue_is_brighter():
    """An inverted or squared contrast has the mutual information of the original (a global
    NCC of the inverted one is -1: the reason ``mi`` is the global stage's default)."""
    a, g = _samples()
    b = a + 0.02 * torch.randn(a.shape, generator=g, dtype=torch.float64)
    same = float(mi(a, b))
    assert float(mi(a, 1.0 - b)) == pytest.approx(same, abs=1e-9)
    assert float(mi(a, b**2)) == pytest.approx(same, rel=0.1)
    assert same < -1.5  # strongly dependent: well above a nat of information


def test_mi_of_independent_samples_is_near_zero():
    a, g = _samples()
    b = torch.rand(a.shape, generator=g, dtype=torch.float64)
    assert abs(float(mi(a, b))) < 0.03


def test_joint_histogram_is_a_probability_whose_marginals_are_the_samples():
    a, _ = _samples(5000)
    joint = joint_histogram(a, a.flip(0))
    assert float(joint.sum()) == pytest.approx(1.0, abs=1e-12)
    assert bool((joint >= 0).all())
    # a constant sample fills one window (three bins) whatever its value, and tells nothing
    constant = torch.full((100,), 3.0, dtype=torch.float64)
    assert int((joint_histogram(constant, a[:100]).sum(1) > 0).sum()) == 3
    assert abs(float(mi(constant, a[:100]))) < 1e-12


def test_normalized_mi_runs_from_independent_to_identical():
    a, g = _samples()
    independent = normalized_mi(a, torch.rand(a.shape, generator=g, dtype=torch.float64))
    identical = normalized_mi(a, a)
    assert independent == pytest.approx(1.0, abs=0.01)
    assert 1.4 < identical <= 2.0  # below 2: the Parzen window spreads each value over three bins
    assert normalized_mi(a, 1 - a) == pytest.approx(identical, abs=1e-9)


def test_mi_is_a_registered_similarity():
    assert SIMILARITIES["mi"] is mi
    assert math.isfinite(float(SIMILARITIES["mi"](torch.rand(100), torch.rand(100))))


def test_lncc_mi_is_local_ncc_plus_mutual_information_over_the_windows_points():
    from neuralreg.losses.similarity import WINDOWED, lncc, lncc_mi

    g = torch.Generator().manual_seed(2)
    a = torch.rand(40, 16, generator=g, dtype=torch.float64)
    b = (0.7 * a + 0.3 * torch.rand(40, 16, generator=g, dtype=torch.float64)).requires_grad_(True)
    assert SIMILARITIES["lncc_mi"] is lncc_mi and "lncc_mi" in WINDOWED
    torch.testing.assert_close(lncc_mi(b, a), lncc(b, a) + mi(b.reshape(-1), a.reshape(-1)), rtol=0, atol=1e-12)
    # gradcheck in float64 with the range pinned (mi scales by it, detached) by an anchor window
    anchor = torch.tensor([[0.0, 1.0] * 8], dtype=torch.float64)
    x = (0.1 + 0.8 * b.detach()[:12]).requires_grad_(True)

    def f(x):
        return lncc_mi(torch.cat([anchor, x]), torch.cat([anchor, a[:12]]))

    assert torch.autograd.gradcheck(f, (x,))
    assert torch.autograd.gradgradcheck(f, (x,))


def test_mi_gradient_gathered_from_the_histogram_is_autograds():
    """The fast path (only the warped sample differentiable: the histogram's gradient gathered,
    ``_Histogram``) gives autograd's value and gradient through the nine products a point."""
    a, g = _samples(5000, seed=3)
    x = a.clone().requires_grad_(True)
    y = a**2 + 0.1 * torch.rand(5000, generator=g, dtype=torch.float64)
    fast = mi(x, y)
    (g_fast,) = torch.autograd.grad(fast, x)
    slow = mi(x, y.clone().requires_grad_(True))  # both differentiable: plain autograd
    (g_slow,) = torch.autograd.grad(slow, x)
    torch.testing.assert_close(fast, slow, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_fast, g_slow, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("name", sorted(SIMILARITIES))
def test_a_batch_of_samples_gives_each_samples_loss_and_gradient(name):
    """``BATCHED`` similarities: (B, N), (B, P, K) or (B, N, C) -> (B,), each the loss of its sample
    alone, with the same gradients (the affine fits of several starts in one call)."""
    from neuralreg.losses import BATCHED, DESCRIPTORS

    loss = SIMILARITIES[name]
    assert loss in BATCHED
    g = torch.Generator().manual_seed(3)
    # windows of points, points with the 13 channels that ``mind_mi`` reads, or points
    shape = (3, 16, 32) if name in WINDOWED else (3, 512, 13) if name in DESCRIPTORS else (3, 512)
    fixed = torch.rand(shape[1:], generator=g, dtype=torch.float64)
    warped = (fixed + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).requires_grad_()
    batch = loss(warped, fixed.expand_as(warped))
    assert batch.shape == (3,)
    (grad,) = torch.autograd.grad(batch.sum(), warped)
    for k in range(3):
        one = warped[k].detach().requires_grad_()
        value = loss(one, fixed)
        torch.testing.assert_close(batch[k], value, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grad[k], torch.autograd.grad(value, one)[0], rtol=1e-10, atol=1e-14)


def test_overlap_mi_counts_only_the_overlap_times_its_share():
    """overlap_mi = share x mi of the counted points (their own intensity range), mi itself
    where every point counts; a batch against one fixed sample."""
    from neuralreg.losses.similarity import overlap_mi

    g = torch.Generator().manual_seed(0)
    warped = torch.rand(3, 4000, generator=g, dtype=torch.float64)
    fixed = warped[0] ** 2 + 0.1 * torch.rand(4000, generator=g, dtype=torch.float64)
    warped[:, :100] = 5.0  # far outside the counted points' range: must not stretch their bins
    weight = (torch.rand(4000, generator=g) > 0.3).double()
    weight[:100] = 0
    kept = weight > 0
    expected = torch.stack([mi(w[kept], fixed[kept]) for w in warped]) * kept.double().mean()
    torch.testing.assert_close(overlap_mi(warped, fixed, weight), expected)
    torch.testing.assert_close(
        overlap_mi(warped, fixed, torch.ones(4000, dtype=torch.float64)), mi(warped, fixed.expand_as(warped))
    )


def test_overlap_mi_gradients_in_values_and_weights_match_finite_differences():
    """The overlap's edge moves with the map: overlap_mi is differentiable in the warped
    values and in the weights (a mask sampled at the warped points); float64 gradcheck and
    gradgradcheck (through the native kernels where they are loaded, as here on the CPU)."""
    from neuralreg.losses.similarity import overlap_mi

    g = torch.Generator().manual_seed(1)
    fixed = torch.rand(300, generator=g, dtype=torch.float64)
    warped = (0.1 + 0.8 * (fixed**2 + 0.2 * torch.rand(300, generator=g, dtype=torch.float64)) / 1.2).requires_grad_()
    weight = (0.1 + 0.9 * torch.rand(300, generator=g, dtype=torch.float64)).requires_grad_()
    # the range that scales the bins is detached by design: pinned by two anchors that count
    anchors = torch.tensor([0.0, 1.0], dtype=torch.float64)
    one = torch.ones(2, dtype=torch.float64)

    def f(w, v):
        return overlap_mi(torch.cat([w, anchors]), torch.cat([fixed, anchors]), torch.cat([v, one]), bins=8)

    assert torch.autograd.gradcheck(f, (warped, weight))
    assert torch.autograd.gradgradcheck(f, (warped, weight))  # the native path's gradient of its gradient


def test_overlap_mi_does_not_reward_a_small_overlap_that_matches():
    """The mutual information of a few points that match is high; times their share it
    loses to a large overlap that matches as well (a fit cannot win by leaving the image)."""
    from neuralreg.losses.similarity import overlap_mi

    g = torch.Generator().manual_seed(2)
    fixed = torch.rand(5000, generator=g)
    warped = fixed + 0.05 * torch.randn(5000, generator=g)
    small = (torch.arange(5000) < 500).float()
    assert mi(warped[:500], fixed[:500]) < mi(warped, fixed) + 0.5  # alone, about as informative
    assert overlap_mi(warped, fixed, torch.ones(5000)) < overlap_mi(warped, fixed, small)


@pytest.mark.parametrize("shape", [(40, 32), (3, 16, 32)])
def test_local_ncc_node_is_autograds_expression_and_gradcheck(shape):
    """Local NCC with a constant target is one autograd node (``_LocalNCC``, its gradient
    written out): the same value as the expression autograd differentiates (bit for bit),
    the same gradient to rounding, and first and second derivatives against finite
    differences (float64)."""
    from neuralreg.losses.similarity import _ncc, lncc

    g = torch.Generator().manual_seed(5)
    fixed = torch.rand(shape, generator=g, dtype=torch.float64)
    warped = (fixed**2 + 0.3 * torch.rand(shape, generator=g, dtype=torch.float64)).requires_grad_()
    node = lncc(warped, fixed)
    assert type(node.grad_fn).__name__ == "_LocalNCCBackward"
    reference = 1.0 - _ncc(warped, fixed, -1).mean(-1)
    assert torch.equal(node, reference)
    weights = torch.rand(node.shape, generator=g, dtype=torch.float64)
    (fast,) = torch.autograd.grad(node, warped, weights)
    (slow,) = torch.autograd.grad(reference, warped, weights)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-15)
    x = warped.detach()[..., :4, :].clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda w: lncc(w, fixed[..., :4, :]), (x,))
    assert torch.autograd.gradgradcheck(lambda w: lncc(w, fixed[..., :4, :]), (x,))
