"""Modality-independent neighbourhood descriptors (MIND-SSC) and their similarity.

MIND (Heinrich et al., 2012; the self-similarity context variant, MIND-SSC, 2013, as
deeds and ConvexAdam use it) describes each voxel by how alike its neighbourhood's patches
are to one another, not by its intensity: two images whose tissues have other intensities
(two contrasts, or two subjects whose soft tissue has intensities of its own) have like
descriptors wherever their structures (edges, layers, homogeneous regions) lie alike. The
registration compares the descriptors at the sampled points by their mean squared
difference (``mind``): a point's descriptor is sampled from a descriptor volume made once
per pyramid level (``mind_ssc``), so the points stay points and the memory the level's.

``mind_mi`` adds the two kinds of evidence: mutual information of the intensities (which
tissue class lies on which) plus ``MIND_WEIGHT`` times the descriptors' difference (where
the structures lie). Alone, the descriptors say where edges are but not which edge is
which, and from a global part far off they take the nearest; alone, mutual information
lets one subject's layer of another tissue slide onto the other's bone where their
classes do not map one to one (docs/benchmarks.md, "Structure and tissue classes together").

Channels: for a 3D image the 12 pairs of its 6 face neighbours (at ``dilation`` voxels)
that are not opposite (distance sqrt(2)), for a 2D image the 4 such pairs of its 4. Each
channel is the box-filtered (side ``2 radius + 1``) squared difference of the image shifted
by the pair's two offsets, then ``exp(-(D - min_c D) / V)`` with V the mean over the
channels of ``D - min_c D``, clamped to [1e-3, 1e3] times its mean over the image: a
descriptor in (0, 1] with 1 on the pair most alike, invariant to the local contrast.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F

from neuralreg.losses.similarity import mi


def _ssc_pairs(d: int) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """The pairs of face-neighbour offsets (unit vectors, +-) at squared distance 2."""
    faces = []
    for axis in range(d):
        for sign in (-1, 1):
            o = [0] * d
            o[axis] = sign
            faces.append(tuple(o))
    return [(p, q) for p, q in itertools.combinations(faces, 2) if sum((a - b) ** 2 for a, b in zip(p, q)) == 2]


def box_sum(x: torch.Tensor, radius: int, d: int) -> torch.Tensor:
    """The sum over the box of side ``2 radius + 1`` around each voxel of the last ``d`` axes
    of ``x`` (*batch, *spatial), the volume extended by its border values: (2 radius + 1)^d
    times what ``avg_pool`` of the replicate-padded volume gives, up to rounding. Axis by
    axis and in place on one copy a pass: 3 (2r + 1) reads a voxel in 3D instead of
    (2r + 1)^3, and no padded volume."""
    out = x
    for axis in range(x.dim() - d, x.dim()):
        n = out.shape[axis]
        summed = out.clone()
        for shift in range(1, radius + 1):
            if shift < n:
                summed.narrow(axis, shift, n - shift).add_(out.narrow(axis, 0, n - shift))  # the voxel shift before
                summed.narrow(axis, 0, n - shift).add_(out.narrow(axis, shift, n - shift))  # the voxel shift after
            k = min(shift, n)  # neighbours beyond a border take the border's value
            summed.narrow(axis, 0, k).add_(out.narrow(axis, 0, 1))
            summed.narrow(axis, n - k, k).add_(out.narrow(axis, n - 1, 1))
        out = summed
    return out


@torch.no_grad()
def mind_ssc(image: torch.Tensor, radius: int = 1, dilation: int = 2) -> torch.Tensor:
    """MIND-SSC descriptors of ``image`` (*spatial, 2D or 3D, float): (C, *spatial),
    C = 12 in 3D and 4 in 2D, values in (0, 1]; the image is extended by its border values.
    Data for the similarity, made once per level: no gradient flows to ``image``."""
    d = image.dim()
    if d not in (2, 3):
        raise ValueError(f"mind_ssc takes a 2D or 3D image, not {d}D")
    img = image.float()
    pad = dilation
    padded = F.pad(img[None, None], (pad,) * (2 * d), mode="replicate")[0, 0]

    def shifted(offset: tuple[int, ...]) -> torch.Tensor:
        index = tuple(slice(pad + o * dilation, pad + o * dilation + n) for o, n in zip(offset, img.shape))
        return padded[index]

    pairs = _ssc_pairs(d)
    diff = img.new_empty((len(pairs), *img.shape))  # (C, *spatial): the pairs' squared differences
    for c, (p, q) in enumerate(pairs):
        torch.sub(shifted(p), shifted(q), out=diff[c]).square_()
    # box sums, not means: the box's size cancels in ssd / var below
    ssd = box_sum(diff, radius, d)
    del diff
    ssd -= ssd.min(0, keepdim=True).values
    var = ssd.mean(0, keepdim=True)
    scale = var.mean()
    var = var.clamp(scale * 1e-3 + 1e-12, scale * 1e3 + 1e-12)
    return ssd.div_(var).neg_().exp_()


def mind(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mean squared difference of descriptors over the points and channels: inputs
    (..., N, C), one loss per leading index."""
    return ((warped - fixed) ** 2).mean((-2, -1))


# mutual information spans about 0.3 nats between an aligned and a misaligned knee, the
# descriptors' mean squared difference about 0.03. At 10 (like ranges) the fields folded
# (up to 6 % of the voxels) and broke their round trips against GradICON's lambda = 1; at 3
# they kept 0-0.15 % folds and most of the gain (docs/benchmarks.md)
MIND_WEIGHT = 3.0


def intensity_and_mind_ssc(image: torch.Tensor) -> torch.Tensor:
    """The intensities and their MIND-SSC descriptors, (1 + C, *spatial): what ``mind_mi`` reads."""
    return torch.cat([image.float()[None], mind_ssc(image)])


def mind_mi(warped: torch.Tensor, fixed: torch.Tensor) -> torch.Tensor:
    """Mutual information of the intensities (channel 0) plus ``MIND_WEIGHT`` times ``mind``
    of the descriptors (the other channels): inputs (..., N, 1 + C), one loss per leading index."""
    return mi(warped[..., 0], fixed[..., 0]) + MIND_WEIGHT * mind(warped[..., 1:], fixed[..., 1:])


# similarity name -> what its points read instead of the intensities: (*spatial) -> (C, *spatial)
DESCRIPTORS = {"mind": mind_ssc, "mind_mi": intensity_and_mind_ssc}
