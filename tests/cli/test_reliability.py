"""Reliability: each defect found by probing the CLI, the batch runner and the Python API (issue 13).

Every test here failed before its fix: the probe, what it gave then, and what it must give now.
"""

import json
import os

import nibabel as nib
import numpy as np
import pytest
import torch

from neuralreg import Image, RegistrationConfig, RegistrationFileError, register_pair
from neuralreg.cli import build_parser, main
from neuralreg.io import write_displacement_field, write_image
from neuralreg.phantoms import triangles_pair

FAST = ["--steps", "12", "--points", "1024", "--quiet"]
TINY = dict(steps=6, points=256, regularizer_points=64, affine_steps=8)


def _one_line_error(code, err, message):
    assert code != 0
    assert err.count("\n") == 1 and err.startswith("neuralreg: error:"), err
    assert message in err, err
    assert "Traceback" not in err


# 1. every help page renders (evaluate's had an unescaped %), 9. and shows each default once
@pytest.mark.parametrize("command", ["register", "warp", "jacobian", "evaluate", "demo", "batch"])
def test_every_help_page_renders_and_shows_defaults_once(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text
    assert "(default: lncc) (default:" not in text
    for line in text.split("--")[1:]:
        assert line.count("(default:") <= 1, line


def test_top_level_help_renders(capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["--help"])
    assert exit_info.value.code == 0 and "register" in capsys.readouterr().out


@pytest.fixture
def fields(tmp_path):
    aff = np.eye(4)
    good = torch.zeros(12, 12, 12, 3)
    write_displacement_field(good, aff, tmp_path / "good.nii.gz")
    # 3D grid, 2 components: (12, 12, 12, 1, 2)
    nib.save(nib.Nifti1Image(np.zeros((12, 12, 12, 1, 2), np.float32), aff), str(tmp_path / "two.nii.gz"))
    nan = np.zeros((12, 12, 12, 1, 3), np.float32)
    nan[3, 4, 5, 0, 1] = np.nan
    nib.save(nib.Nifti1Image(nan, aff), str(tmp_path / "nan.nii.gz"))
    write_image(Image(torch.rand(12, 12, 12), aff), tmp_path / "img.nii.gz")
    return tmp_path


# 2. a field with the wrong number of components; 3. NaN displacements
@pytest.mark.parametrize(
    "command,field,message",
    [
        ("jacobian", "two", "2 displacement component(s) on a 3D grid"),
        ("warp", "two", "2 displacement component(s) on a 3D grid"),
        ("jacobian", "nan", "NaN or Inf displacements"),
        ("warp", "nan", "NaN or Inf displacements"),
    ],
)
def test_bad_displacement_fields_are_rejected(command, field, message, fields, capsys):
    argv = [command, "--displacement", str(fields / f"{field}.nii.gz"), "--out", str(fields / "out.nii.gz")]
    if command == "warp":
        argv += ["--image", str(fields / "img.nii.gz")]
    code = main(argv)
    _one_line_error(code, capsys.readouterr().err, message)
    assert not (fields / "out.nii.gz").exists()


def test_good_field_still_works(fields, capsys):
    assert main(["jacobian", "--displacement", str(fields / "good.nii.gz"), "--out", str(fields / "j.nii.gz")]) == 0
    np.testing.assert_allclose(nib.load(fields / "j.nii.gz").get_fdata(), 1.0, atol=1e-6)


# 9. warp --out with a non-NIfTI name: the message names the user's path, not a hidden temporary
def test_warp_output_format_is_checked_first(fields, capsys):
    out = fields / "x.txt"
    argv = ["warp", "--displacement", str(fields / "good.nii.gz"), "--image", str(fields / "img.nii.gz")]
    code = main([*argv, "--out", str(out)])
    err = capsys.readouterr().err
    _one_line_error(code, err, f"--out {out}: unsupported format")
    assert ".tmp" not in err and not out.exists()
    assert not [p for p in fields.iterdir() if p.name.startswith(".")]


# 6. a label in neither map: valid JSON (null), and the absent labels named
def test_evaluate_absent_label_gives_valid_json(tmp_path, capsys):
    lab = torch.zeros(10, 10, 10, dtype=torch.int32)
    lab[2:6, 2:6, 2:6] = 1
    write_image(Image(lab, np.eye(4)), tmp_path / "a.nii.gz")
    code = main(["evaluate", "--warped-labels", str(tmp_path / "a.nii.gz")] + [
        "--reference-labels", str(tmp_path / "a.nii.gz"), "--labels", "7",
    ])  # fmt: skip
    captured = capsys.readouterr()
    assert code == 0
    result = json.loads(captured.out)  # NaN would not parse as strict JSON below
    json.loads(captured.out, parse_constant=lambda c: pytest.fail(f"invalid JSON constant {c}"))
    assert result["dice"]["mean"] is None and result["dice"]["absent_labels"] == [7]
    assert "label(s) 7 in neither map" in captured.err
    code = main(["evaluate", "--warped-labels", str(tmp_path / "a.nii.gz")] + [
        "--reference-labels", str(tmp_path / "a.nii.gz"), "--labels", "1,7",
    ])  # fmt: skip
    result = json.loads(capsys.readouterr().out)
    assert result["dice"]["mean"] == 1.0 and result["dice"]["absent_labels"] == [7]


# 7. numeric and device options, 9. malformed --config names its file
@pytest.fixture
def pair_files(tmp_path):
    pair = triangles_pair(2, size=32)
    for key in ("fixed", "moving"):
        write_image(pair[key], tmp_path / f"{key}.nii.gz")
    (tmp_path / "bad.json").write_text("{not json")
    (tmp_path / "list.json").write_text("[1, 2]")
    (tmp_path / "unknown.json").write_text('{"stepz": 3}')
    return tmp_path


OPTION_CASES = {
    "--lambda nan": (["--lambda", "nan"], "--lambda: must be a finite number, not nan"),
    "--lambda inf": (["--lambda", "inf"], "--lambda: must be a finite number"),
    "--lambda -1": (["--lambda", "-1"], "--lambda: must be in [0, 1e+06], not -1"),
    "--learning-rate 0": (["--learning-rate", "0"], "--learning-rate: must be in (0, 10], not 0"),
    "--threads 0": (["--threads", "0"], "--threads: must be in [1, 1024], not 0"),
    "--threads -1": (["--threads", "-1"], "--threads: must be in [1, 1024], not -1"),
    "--steps 0": (["--steps", "0"], "--steps: must be in [1, 1000000], not 0"),
    "--points 3": (["--points", "3"], "--points: must be in [8, 2097152], not 3"),
    "--device banana": (["--device", "banana"], "--device: must be cpu, cuda or cuda:N, not 'banana'"),
    "--edge-fraction 2": (["--edge-fraction", "2"], "--edge-fraction: must be in [0, 1], not 2"),
    "--edge-power 0": (["--edge-power", "0"], "--edge-power: must be in (0, 4], not 0"),
    "--edge-power 5": (["--edge-power", "5"], "--edge-power: must be in (0, 4], not 5"),
    "malformed config": (["--config", "{dir}/bad.json"], "--config {dir}/bad.json: not valid JSON"),
    "config not an object": (["--config", "{dir}/list.json"], "expected a JSON object"),
    "config unknown key": (
        ["--config", "{dir}/unknown.json"],
        "--config {dir}/unknown.json: stepz: unknown configuration key(s) 'stepz'",
    ),
    "config missing": (["--config", "{dir}/nope.json"], "--config {dir}/nope.json: file not found"),
}


@pytest.mark.parametrize("case", list(OPTION_CASES))
def test_options_are_validated_up_front(case, pair_files, capsys):
    extra, message = OPTION_CASES[case]
    extra = [e.format(dir=pair_files) for e in extra]
    out = pair_files / "out"
    code = main(["register", "--fixed", str(pair_files / "fixed.nii.gz"), "--moving", str(pair_files / "moving.nii.gz")]
                + ["--out", str(out), *FAST, *extra])  # fmt: skip
    _one_line_error(code, capsys.readouterr().err, message.format(dir=pair_files))
    assert not out.exists()


def test_demo_threads_validated(tmp_path, capsys):
    code = main(["demo", "--out", str(tmp_path / "d"), "--threads", "0", "--quiet"])
    _one_line_error(code, capsys.readouterr().err, "--threads: must be in [1, 1024], not 0")


# 8. Python API: clear TypeErrors, paths and dicts accepted
def test_register_pair_rejects_arrays_and_odd_types_clearly():
    pair = triangles_pair(1, size=24)
    with pytest.raises(TypeError, match=r"moving must be a neuralreg.Image .* not an array; wrap it"):
        register_pair(pair["moving"].data.numpy(), pair["fixed"], TINY)
    with pytest.raises(TypeError, match=r"fixed must be a neuralreg\.Image or a file path, not NoneType"):
        register_pair(pair["moving"], None, TINY)
    with pytest.raises(TypeError, match="config must be a RegistrationConfig, a dict of its keys or None, not list"):
        register_pair(pair["moving"], pair["fixed"], [1])
    with pytest.raises(ValueError, match="unknown configuration key"):
        register_pair(pair["moving"], pair["fixed"], {"stepz": 3})


def test_register_pair_accepts_paths_and_dict_config(tmp_path):
    pair = triangles_pair(1, size=24)
    write_image(pair["moving"], tmp_path / "m.nii.gz")
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    reg = register_pair(str(tmp_path / "m.nii.gz"), tmp_path / "f.nii.gz", TINY)
    ref = register_pair(pair["moving"], pair["fixed"], RegistrationConfig(**TINY))
    assert reg.config == ref.config
    assert reg.history[-1]["loss"] == pytest.approx(ref.history[-1]["loss"], rel=1e-5)


class _Exploit:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_registration_load_is_safe_and_errors_are_one_line(tmp_path):
    from neuralreg import Registration

    pair = triangles_pair(1, size=24)
    reg = register_pair(pair["moving"], pair["fixed"], TINY)
    reg.save(tmp_path / "ok.pt")
    back = Registration.load(tmp_path / "ok.pt")
    np.testing.assert_allclose(back.displacement_on_grid(), reg.displacement_on_grid(), atol=1e-6)

    marker = tmp_path / "pwned"
    state = reg.state()
    state["info"] = {"payload": _Exploit(marker)}
    torch.save(state, tmp_path / "evil.pt")
    with pytest.raises(RegistrationFileError, match="not loaded") as exc_info:
        Registration.load(tmp_path / "evil.pt")
    assert "\n" not in str(exc_info.value)
    assert not marker.exists()  # the payload did not run

    (tmp_path / "corrupt.pt").write_bytes(b"\x80\x04garbage")
    with pytest.raises(RegistrationFileError, match="not a readable neuralreg registration"):
        Registration.load(tmp_path / "corrupt.pt")
    torch.save({"weights": torch.zeros(3)}, tmp_path / "foreign.pt")
    with pytest.raises(RegistrationFileError, match="not a neuralreg registration"):
        Registration.load(tmp_path / "foreign.pt")
    with pytest.raises(RegistrationFileError, match="not found"):
        Registration.load(tmp_path / "missing.pt")


def test_files_of_version_0_1_0_still_load(tmp_path):
    """0.1.0 wrote the same keys without ``prealign`` (and no search facts): still read, same maps."""
    from neuralreg import Registration

    pair = triangles_pair(1, size=24)
    reg = register_pair(pair["moving"], pair["fixed"], {**TINY, "affine_init": "centroid"})
    state = reg.state()
    del state["prealign"]
    state["info"] = {k: v for k, v in state["info"].items() if k not in ("search", "quality")}
    torch.save(state, tmp_path / "old.pt")
    back = Registration.load(tmp_path / "old.pt")
    np.testing.assert_allclose(back.displacement_on_grid(), reg.displacement_on_grid(), atol=1e-6)


def test_cli_reports_bad_registration_file_in_one_line(tmp_path, capsys):
    (tmp_path / "r.pt").write_bytes(b"not a registration")
    write_image(Image(torch.rand(8, 8, 8), np.eye(4)), tmp_path / "img.nii.gz")
    code = main(["warp", "--registration", str(tmp_path / "r.pt"), "--image", str(tmp_path / "img.nii.gz")]
                + ["--out", str(tmp_path / "o.nii.gz")])  # fmt: skip
    _one_line_error(code, capsys.readouterr().err, "is not a readable neuralreg registration")
