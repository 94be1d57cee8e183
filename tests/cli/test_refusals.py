"""What used to run on silently or crash with a raw message is refused in one line (issue 27).

Each test names the defect it reproduces (5-10, 12, 13 of issue 27): the probe, and what it
must give now. The ``--out`` of a refused command is never created.
"""

import copy
import json
import math
import re

import nibabel as nib
import numpy as np
import pytest
import torch

from neuralreg import ConfigError, Image, Registration, RegistrationConfig, RegistrationFileError, register_pair
from neuralreg.cli import main
from neuralreg.io import read_image, write_image
from neuralreg.phantoms import triangles_pair

FAST = ["--steps", "6", "--points", "256", "--affine-steps", "4", "--quiet", "--threads", "1"]
TINY = dict(steps=6, points=256, regularizer_points=64, affine_steps=8)


def _one_line_error(capsys, code, message):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("neuralreg: error:"), err
    assert message in err, err
    assert "Traceback" not in err
    return err


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A small 3D registration saved to a file, its images, and a NIfTI of the moving space."""
    d = tmp_path_factory.mktemp("saved")
    rng = torch.Generator().manual_seed(0)
    fixed = Image(torch.rand(16, 16, 16, generator=rng), np.diag([2.0, 2.0, 2.0, 1.0]))
    moving = Image(torch.rand(16, 16, 16, generator=rng), np.diag([2.0, 2.0, 2.0, 1.0]))
    reg = register_pair(moving, fixed, {**TINY, "affine_init": "centroid"})
    reg.save(d / "ok.pt")
    write_image(moving, d / "moving.nii.gz")
    return d, reg


def _broken(saved_dir, reg, name, change):
    state = copy.deepcopy(reg.state())  # the state's tensors are the fields' own on the CPU
    change(state)
    torch.save(state, saved_dir / name)
    return saved_dir / name


# 5. registration files with NaN parameters, a NaN or singular affine, or a NaN box were accepted
@pytest.mark.parametrize(
    "name,change,message",
    [
        ("nan_param.pt", lambda s: next(iter(s["phi_ab"].values())).fill_(math.nan), "NaN or Inf values"),
        ("nan_affine.pt", lambda s: s["affine"][0].__setitem__(0, math.nan), "affine is not a finite"),
        ("singular.pt", lambda s: s.__setitem__("affine", np.zeros((4, 4)).tolist()), "affine is singular"),
        ("nan_box.pt", lambda s: s["box"].__setitem__("scale", math.nan), "normalized box"),
        ("bad_prealign.pt", lambda s: s.__setitem__("prealign", [[1.0, 2.0]]), "prealign is not a finite"),
        ("bad_grid.pt", lambda s: s["fixed_grid"].__setitem__(0, [-5, 16, 16]), "fixed_grid has shape"),
        ("huge_grid.pt", lambda s: s["fixed_grid"].__setitem__(0, [1 << 20] * 3), "fixed_grid has"),
    ],
)
def test_damaged_registration_files_are_refused(name, change, message, saved, capsys):
    d, reg = saved
    path = _broken(d, reg, name, change)
    with pytest.raises(RegistrationFileError, match="damaged neuralreg registration") as info:
        Registration.load(path)
    assert message in str(info.value) and str(path) in str(info.value)
    for command in ("warp", "jacobian"):
        argv = [command, "--registration", str(path), "--out", str(d / f"{command}.nii.gz")]
        argv += ["--image", str(d / "moving.nii.gz")] if command == "warp" else []
        _one_line_error(capsys, main(argv), message)
        assert not (d / f"{command}.nii.gz").exists()


def test_save_to_a_folder_is_a_clear_error(saved):
    d, reg = saved
    with pytest.raises(RegistrationFileError, match="it is a folder"):
        reg.save(d)


# 6. labels and masks checked for shape, not grid; evaluate ignored affines
def test_labels_and_masks_must_lie_on_their_images_grid(tmp_path, capsys):
    pair = triangles_pair(3, size=40)
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        write_image(pair[key], tmp_path / f"{key}.nii.gz")
    shifted = pair["fixed_labels"].affine.copy()
    shifted[:2, 2] += 40.0
    write_image(Image(pair["fixed_labels"].data, shifted), tmp_path / "shifted.nii.gz")
    write_image(Image((pair["fixed"].data > 0.5).to(torch.uint8), shifted), tmp_path / "mask.nii.gz")
    argv = ["register", "--fixed", str(tmp_path / "fixed.nii.gz"), "--moving", str(tmp_path / "moving.nii.gz")]
    argv += ["--out", str(tmp_path / "out"), *FAST]
    err = _one_line_error(capsys, main([*argv, "--fixed-labels", str(tmp_path / "shifted.nii.gz")]), "not on the grid")
    assert "shifted.nii.gz" in err and "56.6 mm" in err  # the corners' offset, 40 mm on two axes
    _one_line_error(capsys, main([*argv, "--fixed-mask", str(tmp_path / "mask.nii.gz")]), "not on the grid")
    assert not (tmp_path / "out").exists()
    code = main(["evaluate", "--warped-labels", str(tmp_path / "shifted.nii.gz")] + [
        "--reference-labels", str(tmp_path / "fixed_labels.nii.gz"),
    ])  # fmt: skip
    _one_line_error(capsys, code, "not on the grid of the reference label map")
    with pytest.raises(ValueError, match="fixed mask is not on its image's grid"):
        register_pair(pair["moving"], pair["fixed"], TINY, fixed_mask=read_image(tmp_path / "mask.nii.gz"))


# 7. warp --displacement --direction inverse was ignored; Registration.warp(mode="cubic") gave nearest
def test_direction_with_a_displacement_field_and_unknown_modes_are_errors(saved, tmp_path, capsys):
    from neuralreg.io import write_displacement_field

    d, reg = saved
    write_displacement_field(torch.zeros(16, 16, 16, 3), np.eye(4), tmp_path / "f.nii.gz")
    code = main(["warp", "--displacement", str(tmp_path / "f.nii.gz"), "--direction", "inverse"] + [
        "--image", str(d / "moving.nii.gz"), "--out", str(tmp_path / "w.nii.gz"),
    ])  # fmt: skip
    _one_line_error(capsys, code, "--direction applies to --registration only")
    assert not (tmp_path / "w.nii.gz").exists()
    image = read_image(d / "moving.nii.gz")
    for mode in ("cubic", "Linear"):
        with pytest.raises(ValueError, match=f"mode must be 'linear' or 'nearest', not '{mode}'"):
            reg.warp(image, mode=mode)


# 8. tracebacks turned into raw one-liners
def _nifti(path, data, affine):
    img = nib.Nifti1Image(np.asarray(data, np.float32), affine)
    nib.save(img, str(path))
    return path


def test_odd_images_are_refused_with_a_reason(tmp_path, capsys):
    rng = np.random.default_rng(0)
    good = _nifti(tmp_path / "good.nii.gz", rng.random((20, 20, 20)), np.eye(4))
    tiny = _nifti(tmp_path / "tiny.nii.gz", rng.random((5, 5, 5)), np.eye(4))
    flat = _nifti(tmp_path / "flat.nii.gz", rng.random((20, 20, 20)), np.diag([0.01, 10, 10, 1]))
    nan = nib.Nifti1Image(rng.random((20, 20, 20)).astype(np.float32), np.eye(4))
    affine = np.eye(4)
    affine[0, 3] = np.nan
    nan.set_sform(affine, code=1)
    nan.set_qform(None, code=0)
    nib.save(nan, str(tmp_path / "nan.nii.gz"))
    cases = [
        (tiny, "tiny.nii.gz has shape (5, 5, 5): registering needs at least 8 voxels per axis"),
        (flat, "flat.nii.gz has voxels of 0.01 x 10 x 10 mm"),
        (tmp_path / "nan.nii.gz", "nan.nii.gz: the image affine has NaN or Inf entries"),
    ]
    for path, message in cases:
        code = main(["register", "--fixed", str(path), "--moving", str(good), "--out", str(tmp_path / "o"), *FAST])
        _one_line_error(capsys, code, message)
        assert not (tmp_path / "o").exists()
    const = _nifti(tmp_path / "const.nii.gz", np.ones((20, 20, 20)), np.eye(4))
    code = main(["register", "--fixed", str(good), "--moving", str(const), "--out", str(tmp_path / "o"), *FAST])
    _one_line_error(capsys, code, f"moving image {const} is constant")


def test_a_2d_slice_with_a_permuted_affine_reads(tmp_path):
    """12. A sagittal slice (voxel axes along world y and z) was refused as 'singular'."""
    data = np.random.default_rng(0).random((30, 20, 1)).astype(np.float32)
    affine = np.array([[0, 0, 3.0, 5], [0.5, 0, 0, 6], [0, 0.7, 0, 7], [0, 0, 0, 1]])
    _nifti(tmp_path / "sag.nii.gz", data, affine)
    img = read_image(tmp_path / "sag.nii.gz")
    np.testing.assert_allclose(img.affine, [[0.5, 0, 6], [0, 0.7, 7], [0, 0, 1]])
    assert img.shape == (30, 20)


# 9. --config checked far less than the flags; 10. no sanity bounds
CONFIG_CASES = {
    "nan learning rate": ({"learning_rate": math.nan}, "learning_rate: must be a finite number, not nan"),
    "run key": ({"threads": 2}, "threads: is how a run executes, not what it optimizes: a RunConfig key"),
    "steps 30.5": ({"steps": 30.5}, "steps: must be an integer, not 30.5"),
    "steps true": ({"steps": True}, "steps: must be an integer, not True"),
    "steps string": ({"steps": "30"}, "steps: must be an integer, not '30'"),
    "negative window": ({"lncc_window": -1}, "lncc_window: must be in [1, 256], not -1"),
    "negative margin": ({"margin": -1}, "margin: must be in [0, 10], not -1"),
    "negative layers": ({"field": {"hidden_layers": -1}}, "field.hidden_layers: must be in [0, 16], not -1"),
    "lr fraction": ({"final_lr_fraction": -5}, "final_lr_fraction: must be in [0, 1], not -5"),
    "fractions 2.7": ({"stage_fractions": [0.9, 0.9, 0.9]}, "stage_fractions: must add up to 1, not 2.7"),
    "fractions 0": ({"stage_fractions": [0, 0, 0]}, "stage_fractions: must add up to 1, not 0"),
    "patch points 0": ({"lncc_patch_points": 0}, "lncc_patch_points: must be in [1, 4096], not 0"),
    "field null": ({"field": None}, "field: must be an object of FieldConfig keys, not None"),
    "encoding key": ({"field": {"encoding": {"levels": 3}}}, "field.encoding: unknown key(s) 'levels'"),
    "points 1e9": ({"points": 10**9}, "points: must be in [8, 2097152], not 1000000000"),
    "steps 1e12": ({"steps": 10**12}, "steps: must be in [1, 1000000]"),
    "samples": ({"points": 1 << 20, "lncc_patch_points": 64}, "points: 67108864 image samples per field and step"),
    "volume without analytic gradicon": (
        {"volume_weight": 1.0, "jacobian": "autograd"},
        'volume_weight: needs regularizer "gradicon" with jacobian "analytic"',
    ),
}


@pytest.mark.parametrize("case", list(CONFIG_CASES))
def test_config_files_are_checked_like_flags(case, tmp_path, capsys):
    values, message = CONFIG_CASES[case]
    with pytest.raises(ConfigError, match=re.escape(message)):
        RegistrationConfig.from_dict(json.loads(json.dumps(values)))
    (tmp_path / "c.json").write_text(json.dumps(values))
    pair = triangles_pair(1, size=24)
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    code = main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "f.nii.gz")] + [
        "--out", str(tmp_path / "o"), "--config", str(tmp_path / "c.json"), "--quiet",
    ])  # fmt: skip
    _one_line_error(capsys, code, f"--config {tmp_path / 'c.json'}: {message}")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize(
    "flags,message",
    [
        (["--points", "1000000000"], "--points: must be in [8, 2097152], not 1000000000"),
        (["--threads", "0"], "--threads: must be in [1, 1024], not 0"),
        (["--device", "tpu"], "--device: must be cpu, cuda or cuda:N, not 'tpu'"),
        (["--steps", str(10**12)], "--steps: must be in [1, 1000000]"),
        (["--ct-window", "40", "0", "--modality", "ct"], "--ct-window needs a finite CENTER and a WIDTH > 0"),
        (["--ct-window", "40", "-400", "--modality", "ct"], "--ct-window needs a finite CENTER and a WIDTH > 0"),
        (["--backend", "tcnn"], "tcnn backend requested but"),
    ],
)
def test_flags_have_bounds(flags, message, tmp_path, capsys):
    pair = triangles_pair(1, size=24)
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    code = main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "f.nii.gz")] + [
        "--out", str(tmp_path / "o"), "--quiet", *flags,
    ])  # fmt: skip
    _one_line_error(capsys, code, message)
    assert not (tmp_path / "o").exists()


def test_an_explicit_native_backend_that_cannot_build_is_an_error(monkeypatch):
    from neuralreg.errors import InputError
    from neuralreg.fields import native
    from neuralreg.fields.encoding import resolve_backend

    monkeypatch.setattr(native, "hashgrid_available", lambda device: False)
    with pytest.raises(InputError, match="native hash-grid backend requested but"):
        resolve_backend("native", "cpu")
    assert resolve_backend("auto", "cpu") == "torch"  # auto still falls back


# 12. messages
def test_warped_image_keeps_the_moving_intensities(tmp_path):
    pair = triangles_pair(4, size=40)
    moving = Image(pair["moving"].data * 700.0 + 100.0, pair["moving"].affine)  # scanner units, not [0, 1]
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    write_image(moving, tmp_path / "m.nii.gz")
    assert main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "m.nii.gz")]
                + ["--out", str(tmp_path / "o"), *FAST]) == 0  # fmt: skip
    warped = np.asarray(nib.load(tmp_path / "o" / "warped.nii.gz").dataobj)
    assert warped.max() > 400.0  # the moving image's units; the preprocessed image lies in [0, 1]
    assert warped.max() <= float(moving.data.max()) + 1e-3


def test_help_shows_the_demo_seed_and_batch_has_a_ct_window(capsys):
    with pytest.raises(SystemExit):
        main(["demo", "--help"])
    assert "phantom and optimization seed (default: 0)" in " ".join(capsys.readouterr().out.split())
    with pytest.raises(SystemExit):
        main(["batch", "--help"])
    assert "--ct-window" in capsys.readouterr().out


def test_overwrite_onto_a_file_or_an_input_is_refused_before_registering(tmp_path, capsys):
    pair = triangles_pair(1, size=24)
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    (tmp_path / "file").write_text("mine")
    argv = ["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "f.nii.gz"), "--quiet"]
    _one_line_error(capsys, main([*argv, "--out", str(tmp_path / "file"), "--overwrite"]), "is not a folder")
    _one_line_error(capsys, main([*argv, "--out", str(tmp_path / "file" / "o")]), "is a file, not a folder")
    assert (tmp_path / "file").read_text() == "mine"


def test_warp_never_replaces_its_input_or_a_foreign_file(saved, tmp_path, capsys):
    d, _ = saved
    image = tmp_path / "moving.nii.gz"
    image.write_bytes((d / "moving.nii.gz").read_bytes())
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.float32), np.eye(4)), str(tmp_path / "theirs.nii.gz"))
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    argv = ["warp", "--registration", str(d / "ok.pt"), "--image", str(image), "--overwrite", "--out"]
    _one_line_error(capsys, main([*argv, str(image)]), "is an input of this command")
    _one_line_error(capsys, main([*argv, str(tmp_path / "theirs.nii.gz")]), "was not written by neuralreg")
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    assert main([*argv, str(tmp_path / "w.nii.gz")]) == 0
    assert main([*argv, str(tmp_path / "w.nii.gz")]) == 0  # neuralreg's own output: replaced


# 13. API
def test_image_refuses_a_non_finite_affine_and_masks_mean_non_zero():
    affine = np.eye(4)
    affine[1, 1] = np.inf
    with pytest.raises(ValueError, match="NaN or Inf"):
        Image(torch.zeros(4, 4, 4), affine)
    pair = triangles_pair(2, size=32)
    negative = pair["fixed"].with_data(-(pair["fixed"].data > 0.5).float())  # inside: -1, as the CLI reads it
    reg_neg = register_pair(pair["moving"], pair["fixed"], TINY, fixed_mask=negative)
    reg_pos = register_pair(pair["moving"], pair["fixed"], TINY, fixed_mask=negative.with_data(-negative.data))
    assert reg_neg.history[-1]["loss"] == reg_pos.history[-1]["loss"]


# 10. the working set is checked against the memory free before anything runs
def test_a_working_set_larger_than_the_free_memory_is_refused(tmp_path, capsys, monkeypatch):
    from neuralreg.optim import inputs

    monkeypatch.setattr(inputs, "available_memory", lambda device: 64 * 2**20)  # a machine with 64 MiB free
    pair = triangles_pair(1, size=24)
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    code = main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "f.nii.gz")] + [
        "--out", str(tmp_path / "o"), "--points", "100000", "--quiet",
    ])  # fmt: skip
    _one_line_error(capsys, code, "this registration needs about 0.2 GiB (100000 points per step")
    assert not (tmp_path / "o").exists()
    monkeypatch.setattr(inputs, "available_memory", lambda device: 2**40)
    assert main(["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "f.nii.gz")] + [
        "--out", str(tmp_path / "o"), *FAST,
    ]) == 0  # fmt: skip


def test_warp_names_the_input_whose_dimensions_differ(saved, tmp_path, capsys):
    """12. A 2D --reference for a 3D registration was reported the other way round."""
    d, _ = saved
    write_image(Image(torch.rand(16, 16), np.eye(3)), tmp_path / "flat.nii.gz")
    argv = ["warp", "--registration", str(d / "ok.pt"), "--out", str(tmp_path / "w.nii.gz")]
    code = main([*argv, "--image", str(d / "moving.nii.gz"), "--reference", str(tmp_path / "flat.nii.gz")])
    _one_line_error(capsys, code, "--reference is 2D but the transform is 3D")
    code = main([*argv, "--image", str(tmp_path / "flat.nii.gz")])
    _one_line_error(capsys, code, "--image is 2D but the transform is 3D")
    assert not (tmp_path / "w.nii.gz").exists()


def test_a_single_level_pyramid_passes_the_geometry_check():
    pair = triangles_pair(1, size=24)
    cfg = {**TINY, "pyramid": [1], "stage_fractions": [1.0], "affine_steps": 0}
    assert register_pair(pair["moving"], pair["fixed"], cfg).config.pyramid == (1,)
