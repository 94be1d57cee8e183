"""Intensity normalization of the command line (``neuralreg.io.preprocess``)."""

import pytest
import torch

from neuralreg.errors import InputError
from neuralreg.geometry.image import Image
from neuralreg.io import preprocess


def test_mri_keeps_a_small_bright_tissue_and_clips_rare_outliers():
    g = torch.Generator().manual_seed(0)
    data = 0.3 + 0.05 * torch.rand(100, 100, 100, generator=g)  # background and soft tissue
    flat = data.view(-1)
    bright = torch.randperm(flat.numel(), generator=g)
    cartilage, spikes = bright[:5000], bright[5000:5500]  # 0.5 % bright tissue, 0.05 % spikes
    flat[cartilage] = torch.linspace(0.7, 0.9, 5000)
    flat[spikes] = 50.0
    img = Image(data, torch.eye(4).double().numpy())
    out = preprocess(img).data.view(-1)
    assert float(out.min()) == 0.0 and float(out.max()) == 1.0
    assert bool((out[spikes] == 1.0).all())  # the outliers saturate
    kept = out[cartilage]  # the bright tissue keeps its contrast: only its top tenth saturates
    assert float((kept < 1.0).float().mean()) > 0.85 and float(kept[kept < 1].max() - kept.min()) > 0.2
    # clipping at the 99th percentile (the default before) flattened all of it
    assert bool((preprocess(img, percentile=99.0).data.view(-1)[cartilage] == 1.0).all())


def test_modalities_and_a_constant_image():
    img = Image(torch.arange(8.0).reshape(2, 2, 2), torch.eye(4).double().numpy())
    assert torch.equal(preprocess(img, "none").data, img.data)
    assert float(preprocess(img, "ct", ct_window=(4.0, 8.0)).data.max()) == pytest.approx(7 / 8)
    with pytest.raises(InputError, match="constant"):
        preprocess(Image(torch.ones(2, 2, 2), torch.eye(4).double().numpy()))
