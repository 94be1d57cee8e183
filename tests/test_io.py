"""NIfTI writing: ``.nii.gz`` compressed only where it pays, every file readable by nibabel and SimpleITK."""

import gzip

import nibabel as nib
import numpy as np
import pytest
import torch

from neuralreg import io
from neuralreg.geometry.image import Image

AFFINE = np.array([[0.0, 0.0, 0.7, -20.0], [0.36, 0.0, 0.0, 5.0], [0.0, -0.36, 0.0, 40.0], [0, 0, 0, 1]])


def _raw_size(path) -> int:
    with gzip.open(path, "rb") as f:
        return len(f.read())


def test_float_field_is_stored_and_labels_compressed_both_read_back_exactly(tmp_path):
    g = torch.Generator().manual_seed(0)
    disp = torch.randn(24, 32, 28, 3, generator=g)  # float noise: gzip saves a few per cent at most
    labels = torch.zeros(24, 32, 28, dtype=torch.int32)
    labels[5:15, 8:20, 4:20] = 3
    field_path, label_path = tmp_path / "field.nii.gz", tmp_path / "labels.nii.gz"
    io.write_displacement_field(disp, AFFINE, field_path)
    io.write_image(Image(labels, AFFINE), label_path, dtype=np.int32)

    raw = _raw_size(field_path)
    assert field_path.stat().st_size >= raw  # stored: deflate level 0 adds a few header bytes
    assert label_path.stat().st_size < 0.05 * _raw_size(label_path)  # compressed

    back = io.read_displacement_field(field_path)
    torch.testing.assert_close(back.data, disp, rtol=0, atol=0)
    np.testing.assert_allclose(back.affine, AFFINE)
    img = nib.load(str(label_path))
    np.testing.assert_array_equal(np.asarray(img.dataobj), labels.numpy())
    np.testing.assert_allclose(img.affine, AFFINE)

    sitk = pytest.importorskip("SimpleITK")
    field = sitk.ReadImage(str(field_path))
    assert field.GetNumberOfComponentsPerPixel() == 3
    lps = sitk.GetArrayFromImage(field)  # (z, y, x, 3), ITK's LPS vectors
    np.testing.assert_array_equal(lps.transpose(2, 1, 0, 3), (disp.numpy() * io.LPS.astype(np.float32)))
    np.testing.assert_array_equal(sitk.GetArrayFromImage(sitk.ReadImage(str(label_path))).transpose(2, 1, 0), labels)


def test_plain_nii_is_written_uncompressed(tmp_path):
    data = torch.rand(8, 9, 10)
    io.write_image(Image(data, AFFINE), tmp_path / "a.nii")
    with open(tmp_path / "a.nii", "rb") as f:
        assert f.read(2) != b"\x1f\x8b"  # not gzip
    np.testing.assert_array_equal(np.asarray(nib.load(str(tmp_path / "a.nii")).dataobj), data.numpy())


def test_a_nii_gz_is_the_same_bytes_whatever_its_name_and_time(tmp_path):
    """No file name and no time in the gzip header: an image written twice, under two names,
    is the same bytes, and nibabel reads it back."""
    image = Image.from_array(torch.arange(24 * 20 * 16, dtype=torch.float32).reshape(24, 20, 16) % 7)
    io.write_image(image, tmp_path / "a.nii.gz")
    io.write_image(image, tmp_path / "b.nii.gz")
    data = (tmp_path / "a.nii.gz").read_bytes()
    assert data == (tmp_path / "b.nii.gz").read_bytes()
    assert data[3] & 0x08 == 0 and data[4:8] == bytes(4)  # gzip header: no FNAME flag, MTIME 0
    np.testing.assert_array_equal(np.asarray(nib.load(tmp_path / "b.nii.gz").dataobj), image.data.numpy())
