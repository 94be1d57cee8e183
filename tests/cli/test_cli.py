"""The command line: outputs, ITK convention through SimpleITK, and every bad input."""

import json

import nibabel as nib
import numpy as np
import pytest
import torch

from neuralreg.cli import main
from neuralreg.io import read_displacement_field, write_image
from neuralreg.io.folders import MANIFEST
from neuralreg.optim.search import prefer_small_rotation
from neuralreg.phantoms import knee_phantom_pair, triangles_pair

FAST = ["--steps", "12", "--points", "1024", "--quiet"]


@pytest.fixture(scope="module")
def phantom_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("phantom")
    pair = knee_phantom_pair(1, shape=(20, 28, 24), spacing=(1.5, 1.0, 1.0))
    # an oblique, LAS-like affine for the fixed image: world coordinates must decide
    rot = np.array([[np.cos(0.2), -np.sin(0.2), 0], [np.sin(0.2), np.cos(0.2), 0], [0, 0, 1]])
    aff = pair["fixed"].affine.copy()
    aff[:3, :3] = rot @ np.diag([-1.5, 1.0, 1.0])
    files = {}
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        img = pair[key]
        if key.startswith("fixed"):
            img = type(img)(img.data, aff)
        files[key] = d / f"{key}.nii.gz"
        write_image(img, files[key])
    return files


@pytest.fixture(scope="module")
def registered(phantom_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "out"
    f = phantom_files
    code = main(
        ["register", "--fixed", str(f["fixed"]), "--moving", str(f["moving"]), "--out", str(out)]
        + ["--fixed-labels", str(f["fixed_labels"]), "--moving-labels", str(f["moving_labels"])]
        + FAST
    )
    assert code == 0
    return out


def test_register_writes_every_output(registered):
    names = {p.name for p in registered.iterdir()}
    expected = {
        "warped.nii.gz",
        "warped_labels.nii.gz",
        "displacement_forward.nii.gz",
        "displacement_inverse.nii.gz",
        "jacobian.nii.gz",
        "affine.tfm",
        "registration.pt",
        "report.json",
        "figure.png",
    }
    assert names == expected | {MANIFEST}
    assert set(json.loads((registered / MANIFEST).read_text())["files"]) == expected  # what --overwrite may replace

    def no_nan(token):
        raise AssertionError(f"report.json holds {token}, which is not JSON")

    report = json.loads((registered / "report.json").read_text(), parse_constant=no_nan)
    for key in ("config", "versions", "timings", "final_loss_terms", "percent_folds_forward"):
        assert key in report
    timings = report["timings"]  # the call's CPU time counts every thread: more than nothing, at most threads x wall
    assert 0 < timings["registration_cpu_seconds"] <= 4 * timings["registration_seconds"] + 1
    search = report["global_search"]
    assert 1 <= search["distinct_starts"] <= len(search["candidate_losses"])
    losses, rotations = search["candidate_losses"], search["candidate_rotations_deg"]
    distinct = [k for k, v in enumerate(losses) if v is not None]
    assert search["chosen"] == prefer_small_rotation(distinct, losses, rotations)
    assert 0 <= report["dice_after"]["mean"] <= 1
    assert report["inverse_consistency_error_mm"] >= 0
    contrast = report["contrast"]  # what the first field stage fitted: the images' NCC and NMI after the global part
    assert contrast["first_stage_similarity"] in ("lncc", "mi") and -1 <= contrast["ncc_after_global"] <= 1
    assert contrast["nmi_after_global"] >= 1 and contrast["nmi_after_first_stage"] >= 1
    warped = nib.load(registered / "warped.nii.gz")
    assert warped.shape == (20, 28, 24)


def test_displacement_field_applies_in_simpleitk_as_our_warp(registered, phantom_files):
    sitk = pytest.importorskip("SimpleITK")
    field = sitk.ReadImage(str(registered / "displacement_forward.nii.gz"), sitk.sitkVectorFloat64)
    transform = sitk.DisplacementFieldTransform(field)
    moving = sitk.ReadImage(str(phantom_files["moving_labels"]))
    fixed = sitk.ReadImage(str(phantom_files["fixed_labels"]))
    warped_sitk = sitk.Resample(moving, fixed, transform, sitk.sitkNearestNeighbor, 0)
    ours = nib.load(registered / "warped_labels.nii.gz").get_fdata()
    theirs = sitk.GetArrayFromImage(warped_sitk).transpose(2, 1, 0)  # sitk arrays are z, y, x
    assert (ours == theirs).mean() > 0.995


def test_warp_and_jacobian_commands(registered, phantom_files, tmp_path):
    out = tmp_path / "w.nii.gz"
    assert (
        main(
            [
                "warp",
                "--registration",
                str(registered / "registration.pt"),
                "--image",
                str(phantom_files["moving_labels"]),
                "--interpolation",
                "nearest",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    ours = nib.load(registered / "warped_labels.nii.gz").get_fdata()
    np.testing.assert_array_equal(nib.load(out).get_fdata(), ours)
    out2 = tmp_path / "w2.nii.gz"
    assert (
        main(
            [
                "warp",
                "--displacement",
                str(registered / "displacement_forward.nii.gz"),
                "--image",
                str(phantom_files["moving_labels"]),
                "--interpolation",
                "nearest",
                "--out",
                str(out2),
            ]
        )
        == 0
    )
    assert (nib.load(out2).get_fdata() == ours).mean() > 0.995
    jac = tmp_path / "j.nii.gz"
    assert main(["jacobian", "--registration", str(registered / "registration.pt"), "--out", str(jac)]) == 0
    np.testing.assert_allclose(
        nib.load(jac).get_fdata(), nib.load(registered / "jacobian.nii.gz").get_fdata(), rtol=1e-4, atol=1e-4
    )


def test_evaluate_command(registered, phantom_files, capsys):
    assert (
        main(
            [
                "evaluate",
                "--warped-labels",
                str(registered / "warped_labels.nii.gz"),
                "--reference-labels",
                str(phantom_files["fixed_labels"]),
                "--labels",
                "2,4",
                "--jacobian",
                str(registered / "jacobian.nii.gz"),
            ]
        )
        == 0
    )
    result = json.loads(capsys.readouterr().out)
    assert set(result["dice"]["per_label"]) <= {"2", "4"} and "percent_folds" in result


def test_displacement_field_round_trip(registered):
    field = read_displacement_field(registered / "displacement_forward.nii.gz")
    from neuralreg.result import Registration

    reg = Registration.load(registered / "registration.pt")
    torch.testing.assert_close(field.data, reg.displacement_on_grid(direction="forward"), rtol=1e-5, atol=1e-4)


def test_2d_png_registration(tmp_path):
    from PIL import Image as PILImage

    pair = triangles_pair(4, size=48)
    for key in ("fixed", "moving"):
        PILImage.fromarray((pair[key].data.numpy() * 255).astype(np.uint8)).save(tmp_path / f"{key}.png")
    out = tmp_path / "out"
    assert (
        main(
            [
                "register",
                "--fixed",
                str(tmp_path / "fixed.png"),
                "--moving",
                str(tmp_path / "moving.png"),
                "--out",
                str(out),
            ]
            + FAST
        )
        == 0
    )
    assert nib.load(out / "warped.nii.gz").shape == (48, 48, 1)


# ---- bad input: one line on stderr, non-zero exit, no traceback, nothing written ----


def _nifti(path, data, affine=None):
    nib.save(nib.Nifti1Image(np.asarray(data), np.eye(4) if affine is None else affine), str(path))
    return path


@pytest.fixture
def bad_inputs(tmp_path):
    rng = np.random.default_rng(0)
    good = _nifti(tmp_path / "good.nii.gz", rng.random((10, 11, 12)).astype(np.float32))
    return {
        "dir": tmp_path,
        "good": good,
        "good2d": _nifti(tmp_path / "good2d.nii.gz", rng.random((10, 11)).astype(np.float32)),
        "4d": _nifti(tmp_path / "4d.nii.gz", rng.random((5, 6, 7, 3)).astype(np.float32)),
        "1d": _nifti(tmp_path / "1d.nii.gz", rng.random((1, 9, 1)).astype(np.float32)),
        "nan": _nifti(
            tmp_path / "nan.nii.gz", np.where(rng.random((10, 11, 12)) > 0.5, np.nan, 1.0).astype(np.float32)
        ),
        "const": _nifti(tmp_path / "const.nii.gz", np.ones((10, 11, 12), np.float32)),
        "empty_mask": _nifti(tmp_path / "empty_mask.nii.gz", np.zeros((10, 11, 12), np.uint8)),
        "float_labels": _nifti(tmp_path / "fl.nii.gz", rng.random((10, 11, 12)).astype(np.float32)),
        "garbage": (tmp_path / "garbage.nii.gz"),
        "txt": (tmp_path / "image.txt"),
    }


def _register(files, fixed, moving, *extra, out=None):
    out = out or files["dir"] / "out"
    return ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(out), *FAST, *extra]


CASES = {
    "missing file": (lambda f: _register(f, f["dir"] / "nope.nii.gz", f["good"]), "not found"),
    "unreadable file": (lambda f: _register(f, f["garbage"], f["good"]), "not a readable NIfTI"),
    "unsupported format": (lambda f: _register(f, f["txt"], f["good"]), "unsupported format"),
    "4D image": (lambda f: _register(f, f["4d"], f["good"]), "only 2D and 3D"),
    "1D image": (lambda f: _register(f, f["1d"], f["good"]), "at least 2 voxels"),
    "different dimensionality": (lambda f: _register(f, f["good2d"], f["good"]), "2D but moving image is 3D"),
    "NaN voxels": (lambda f: _register(f, f["nan"], f["good"]), "NaN or Inf"),
    "constant image": (lambda f: _register(f, f["const"], f["good"]), "constant"),
    "empty mask": (lambda f: _register(f, f["good"], f["good"], "--fixed-mask", str(f["empty_mask"])), "empty"),
    "non-integer labels": (
        lambda f: _register(f, f["good"], f["good"], "--fixed-labels", str(f["float_labels"])),
        "not an integer label map",
    ),
    "output holds the inputs": (lambda f: _register(f, f["good"], f["good"], out=f["dir"]), "holds the input"),
    "GPU without CUDA": (lambda f: _register(f, f["good"], f["good"], "--device", "cuda"), "no CUDA GPU"),
    "bad config file": (lambda f: _register(f, f["good"], f["good"], "--config", str(f["txt"])), "error"),
    "bad edge fraction": (
        lambda f: _register(f, f["good"], f["good"], "--edge-fraction", "2"),
        "--edge-fraction: must be in [0, 1], not 2",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gives_one_line_and_writes_nothing(case, bad_inputs, capsys):
    if case == "GPU without CUDA" and torch.cuda.is_available():
        pytest.skip("a CUDA GPU is present")
    bad_inputs["garbage"].write_bytes(b"this is not a nifti file")
    bad_inputs["txt"].write_text("{not json")
    before = sorted(p.name for p in bad_inputs["dir"].iterdir())
    argv, message = CASES[case]
    code = main(argv(bad_inputs))
    err = capsys.readouterr().err
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("neuralreg: error:"), err
    assert message in err
    assert "Traceback" not in err
    assert sorted(p.name for p in bad_inputs["dir"].iterdir()) == before


def test_console_script_exit_code_and_stderr(tmp_path):
    import subprocess
    import sys

    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "neuralreg",
            "register",
            "--fixed",
            str(tmp_path / "a.nii"),
            "--moving",
            str(tmp_path / "b.nii"),
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "not found" in proc.stderr
    assert not (tmp_path / "o").exists()


def test_main_leaves_the_callers_warnings_and_signals_as_they_were(tmp_path, capsys):
    import signal
    import warnings

    filters, show, handler = list(warnings.filters), warnings.showwarning, signal.getsignal(signal.SIGTERM)
    threads = torch.get_num_threads()
    assert main(["evaluate", "--warped-labels", str(tmp_path / "nope.nii.gz"), "--reference-labels", "x"]) == 2
    assert "not found" in capsys.readouterr().err
    assert warnings.filters == filters and warnings.showwarning is show and signal.getsignal(signal.SIGTERM) == handler
    pair = triangles_pair(1, size=24)
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    argv = ["register", "--fixed", str(tmp_path / "f.nii.gz"), "--moving", str(tmp_path / "f.nii.gz"), "--out"]
    assert main([*argv, str(tmp_path / "o"), "--steps", "3", "--threads", str(threads + 1), "--quiet"]) == 0
    assert torch.get_num_threads() == threads


def test_the_command_spins_briefly_only_where_it_does_not_share_its_cpus():
    """Sharing its CPUs (the default) the command keeps libgomp's spin; with
    ``NEURALREG_SHARE_CPUS=0`` it spins 500 rounds, unless the user set a policy or a count."""
    import os
    import subprocess
    import sys

    code = "import neuralreg.cli, os; print(os.environ.get('GOMP_SPINCOUNT'))"
    env = {
        k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "NEURALREG_SHARE_CPUS")
    }

    def spin(**extra):
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env={**env, **extra})
        return run.stdout.strip()

    assert spin() == "None"
    assert spin(NEURALREG_SHARE_CPUS="0") == "500"
    assert spin(NEURALREG_SHARE_CPUS="0", GOMP_SPINCOUNT="7") == "7"
    assert spin(NEURALREG_SHARE_CPUS="0", OMP_WAIT_POLICY="ACTIVE") == "None"  # the user's policy decides
    lazy = "import sys, neuralreg; print('torch' in sys.modules, neuralreg.RegistrationConfig().steps)"
    out = subprocess.run([sys.executable, "-c", lazy], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split() == ["False", "500"]  # `import neuralreg` alone loads no torch; its names load on use


def test_the_register_flags_are_read_from_the_config_dataclasses(capsys):
    """Each option with a flag in its metadata is a flag of ``register`` and ``batch``, with
    the choices of its ``Literal`` type and its dataclass default; the names of the
    similarity and regularizer types are those of the losses' tables."""
    import dataclasses

    from neuralreg import losses
    from neuralreg.config import FieldConfig, RegistrationConfig, RunConfig, choices

    assert choices(RegistrationConfig, "similarity") == tuple(losses.SIMILARITIES)
    assert choices(RegistrationConfig, "regularizer") == tuple(losses.REGULARIZERS)
    flags = [
        f.metadata["flag"]
        for cls in (RegistrationConfig, FieldConfig, RunConfig)
        for f in dataclasses.fields(cls)
        if "flag" in f.metadata
    ]
    assert len(flags) == 16 and len(set(flags)) == 16
    for command in ("register", "batch"):
        with pytest.raises(SystemExit) as exit_:
            main([command, "--help"])
        assert exit_.value.code == 0
        text = " ".join(capsys.readouterr().out.split())
        assert all(flag in text for flag in flags), [f for f in flags if f not in text]
        assert "{mse,ncc,lncc,mi,lncc_mi,mind,mind_mi}" in text and "{auto,torch,native,tcnn}" in text
        assert "similarity measure (default: lncc)" in text and "optimization steps (default: 500)" in text
        assert "between the first and the last (default: 0.0)" in text
