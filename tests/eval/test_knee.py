"""OAI knee protocol helpers, the shared scoring, the baselines and the knee example scripts."""

import csv
import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from neuralreg_eval import knee

from neuralreg import Image, RegistrationConfig, register_pair
from neuralreg.io import DisplacementField, read_image, write_image
from neuralreg.metrics import dice
from neuralreg.phantoms import knee_labels, knee_phantom_pair, synthesize_mr

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


def load_example(name):
    spec = importlib.util.spec_from_file_location(name, EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def test_resample_labels_keeps_thin_structures_and_world_extent():
    lab = knee_labels((40, 64, 64), (1.5, 1.0, 1.0))
    small = knee.resample_to_shape(lab, (20, 32, 32), labels=True)
    assert set(torch.unique(small.data).tolist()) == set(torch.unique(lab.data).tolist())
    for v in (1, 2, 3, 4):  # volume kept within 25 % (cartilage is 2-3 voxels thick)
        ratio = float((small.data == v).sum()) * 8 / float((lab.data == v).sum())
        assert 0.75 < ratio < 1.25, (v, ratio)
    # the grid covers the same world box: first and last voxel edges coincide
    for img in (lab, small):
        lo = img.affine[:3, :3] @ np.full(3, -0.5) + img.affine[:3, 3]
        hi = img.affine[:3, :3] @ (np.asarray(img.shape) - 0.5) + img.affine[:3, 3]
        if img is lab:
            ref = (lo, hi)
    np.testing.assert_allclose(lo, ref[0])
    np.testing.assert_allclose(hi, ref[1])
    mr = knee.resample_to_shape(synthesize_mr(lab), (20, 32, 32))
    assert mr.shape == (20, 32, 32) and mr.data.is_floating_point()


def test_flip_is_chosen_from_bone_overlap():
    lab = knee_labels((40, 64, 64), (1.5, 1.0, 1.0), seed=3)
    shifted = lab.with_data(torch.roll(lab.data, 6, 0))  # asymmetric along left-right
    mirrored = knee.flip_left_right(shifted)
    assert knee.left_right_axis(lab) == 0
    assert torch.equal(knee.flip_left_right(mirrored).data, shifted.data)
    assert knee.choose_flip(mirrored, shifted)
    assert not knee.choose_flip(shifted, shifted)


def test_score_maps_agrees_with_the_registration_and_identity():
    pair = knee_phantom_pair(2, shape=(24, 40, 40))
    ml, fl = pair["moving_labels"], pair["fixed_labels"]
    zero = DisplacementField(torch.zeros(*fl.shape, 3), fl.affine)
    ident = knee.score_maps(zero, DisplacementField(torch.zeros(*ml.shape, 3), ml.affine), ml, fl)
    assert ident["percent_folds_forward"] == 0.0 and ident["inverse_consistency_error_mm"] < 1e-4
    assert ident["cartilage"] == pytest.approx(knee.cartilage_dice(ml.data, fl.data)["mean"])

    cfg = RegistrationConfig(steps=60, points=2048, regularizer_points=512)
    reg = register_pair(pair["moving"], pair["fixed"], cfg)
    fwd, inv = knee.registration_maps(reg)
    s = knee.score_maps(fwd, inv, ml, fl)
    warped = reg.warp(ml, mode="nearest")
    assert s["cartilage"] == pytest.approx(knee.cartilage_dice(warped.data, fl.data)["mean"], abs=0.01)
    assert s["bone"] == pytest.approx(dice(warped.data, fl.data, (1, 3))["mean"], abs=0.01)
    assert s["percent_folds_forward"] == pytest.approx(reg.percent_folds(), abs=0.01)
    assert s["inverse_consistency_error_mm"] == pytest.approx(reg.inverse_consistency_error(), rel=0.15, abs=0.05)
    assert s["cartilage"] > ident["cartilage"] + 0.04


@pytest.fixture(scope="module")
def phantom_pair_dir(tmp_path_factory):
    """A prepared pair folder (the benchmark's layout) from the knee phantom."""
    d = tmp_path_factory.mktemp("pairs") / "pairs" / "phantom-0"
    d.mkdir(parents=True)
    pair = knee_phantom_pair(4, shape=(24, 40, 40), amplitude_mm=6.0)
    for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
        write_image(pair[key], d / f"{key}.nii.gz")
    return d


@pytest.mark.slow
def test_ants_baseline_improves_overlap_repeatably_in_the_isolated_runner(phantom_pair_dir):
    pytest.importorskip("ants", reason="antspyx not installed (pip install 'neuralreg[baselines]')")
    from neuralreg_eval import benchmark

    ml = read_image(phantom_pair_dir / "moving_labels.nii.gz")
    fl = read_image(phantom_pair_dir / "fixed_labels.nii.gz")
    before = knee.cartilage_dice(ml.data.round().long(), fl.data.round().long())["mean"]
    # each run in a fresh child process (1 ITK thread), scored by knee.score_maps
    first = benchmark.run_method("ants", phantom_pair_dir, threads=1)
    assert (
        first["cartilage"] > before + 0.03
        and first["inverse_consistency_error_mm"] < 1.0
        and first["percent_folds_forward"] < 0.1
    )
    assert first["cpu_seconds"] > 0 and 50 < first["peak_memory_mb"] < 8000
    second = benchmark.run_method("ants", phantom_pair_dir, threads=1)
    for key in ("cartilage", "bone", "inverse_consistency_error_mm"):  # seeded: the same maps again
        assert second[key] == pytest.approx(first[key], abs=1e-6)


@pytest.mark.slow
def test_elastix_baseline_runs_and_improves_overlap(phantom_pair_dir, tmp_path, monkeypatch):
    from neuralreg_eval import baselines

    if not baselines.available("elastix"):
        pytest.skip("itk-elastix not installed (pip install 'neuralreg[baselines]')")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    res = baselines.elastix_bspline(
        phantom_pair_dir / "moving.nii.gz", phantom_pair_dir / "fixed.nii.gz", threads=1, iterations=40
    )
    assert res.inverse is None
    assert list(cwd.iterdir()) == []  # transformix leaves no deformationField.nii behind
    ml = read_image(phantom_pair_dir / "moving_labels.nii.gz")
    fl = read_image(phantom_pair_dir / "fixed_labels.nii.gz")
    ml, fl = Image(ml.data.round().long(), ml.affine), Image(fl.data.round().long(), fl.affine)
    s = knee.score_maps(res.forward, None, ml, fl)
    assert s["cartilage"] > knee.cartilage_dice(ml.data, fl.data)["mean"] + 0.03
    assert np.isnan(s["inverse_consistency_error_mm"])


def test_fireants_baseline_runs_and_improves_overlap(tmp_path):
    from neuralreg_eval import baselines

    if not baselines.available("fireants"):
        pytest.skip("FireANTs not installed (pip install fireants)")
    # FireANTs 1.5 needs >= 32 voxels per axis (it pads coarse levels up to 32)
    pair = knee_phantom_pair(4, shape=(32, 48, 48), amplitude_mm=6.0)
    for key in ("moving", "fixed"):
        write_image(pair[key], tmp_path / f"{key}.nii.gz")
    res = baselines.fireants_greedy(tmp_path / "moving.nii.gz", tmp_path / "fixed.nii.gz", threads=1)
    ml, fl = pair["moving_labels"], pair["fixed_labels"]
    ml, fl = Image(ml.data.round().long(), ml.affine), Image(fl.data.round().long(), fl.affine)
    s = knee.score_maps(res.forward, res.inverse, ml, fl)
    assert s["cartilage"] > knee.cartilage_dice(ml.data, fl.data)["mean"] + 0.03
    assert s["inverse_consistency_error_mm"] < 2.0


@pytest.mark.slow
def test_knee_benchmark_on_oai_labels(shared_data, tmp_path):
    bench = load_example("knee_benchmark")
    methods = "neuralreg,ants" if importlib.util.find_spec("ants") else "neuralreg"
    out = tmp_path / "kb"
    args = ["--out", str(out), "--pairs", "1", "--shape", "24", "48", "48", "--steps", "40", "--threads", "1"]
    assert bench.main([*args, "--methods", methods]) == 0
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert {r["method"] for r in rows} == set(methods.split(","))
    for r in rows:
        assert float(r["bone"]) > float(r["initial_bone"]) and float(r["percent_folds_forward"]) < 0.5
        assert float(r["seconds"]) > 0 and float(r["peak_memory_mb"]) > 50
        # the whole command (start-up, reading, registration, writing) outlasts its registration call
        assert float(r["command_seconds"]) > float(r["seconds"]) and float(r["command_cpu_seconds"]) > 0
    assert (out / "results.md").read_text().count("| neuralreg |") == 2
    for r in rows:  # scored where the moving image has data too: these fields of view cut nothing
        assert float(r["bone_in_view"]) == pytest.approx(float(r["bone"]), abs=0.02)
        assert r["gross_failure_in_view"] in ("True", "False") and float(r["affine_bone_in_view"]) > 0
    assert " in view) |" in (out / "results.md").read_text()
    assert (out / "cartilage_dice.png").stat().st_size > 1000
    facts = json.loads(next((out / "pairs").glob("*/pair.json")).read_text())
    assert facts["fixed"] != facts["moving"]
    # re-run: finished rows are kept, nothing is recomputed
    mtime = (out / "results.csv").stat().st_mtime_ns
    assert bench.main([*args, "--methods", methods]) == 0
    assert len(list(csv.DictReader(open(out / "results.csv")))) == len(rows)
    assert (out / "results.csv").stat().st_mtime_ns == mtime


def test_knee_benchmark_bad_input_is_one_line(tmp_path, capsys):
    bench = load_example("knee_benchmark")
    assert bench.main(["--out", str(tmp_path / "o"), "--data", str(tmp_path), "--methods", "neuralreg"]) == 2
    assert bench.main(["--out", str(tmp_path / "o"), "--data", str(tmp_path), "--methods", "bogus"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)


def test_register_knee_pair_flips_and_scores(tmp_path, capsys):
    ex = load_example("register_knee_pair")
    pair = knee_phantom_pair(5, shape=(24, 40, 40), amplitude_mm=6.0)
    files = {}
    for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
        img = pair[key]
        if key.startswith("moving"):  # a right knee: stored mirrored
            img = knee.flip_left_right(img)
        files[key] = tmp_path / f"{key}.nii.gz"
        write_image(img, files[key])
    base = [str(files["fixed"]), str(files["moving"]), "--shape", "24", "40", "40", "--steps", "80", "--threads", "1"]
    labels = ["--fixed-labels", str(files["fixed_labels"]), "--moving-labels", str(files["moving_labels"])]
    assert ex.main([*base, *labels, "--flip-moving", "--out", str(tmp_path / "out")]) == 0
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["oai_cartilage_dice"]["mean"] > report["oai_cartilage_dice_before"]["mean"] + 0.05
    assert report["percent_folds_forward"] < 0.1
    capsys.readouterr()
    assert ex.main([*base, "--fixed-labels", str(files["fixed_labels"]), "--out", str(tmp_path / "o2")]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not (tmp_path / "o2").exists()


@pytest.mark.slow
def test_compare_gradicon_plumbing_with_an_untrained_model(tmp_path, monkeypatch, capsys):
    pytest.importorskip("icon_registration", reason="icon_registration not installed")
    ex = load_example("compare_gradicon")
    pairs = tmp_path / "pairs"
    d = pairs / "phantom-0"
    d.mkdir(parents=True)
    # the knee network pools 5 times after halving: 72^3 is about the smallest grid it takes
    pair = knee_phantom_pair(6, shape=(72, 72, 72), spacing=(1.0, 1.0, 1.0), amplitude_mm=3.0)
    for key in ("moving", "fixed", "moving_labels", "fixed_labels"):
        write_image(pair[key], d / f"{key}.nii.gz")
    assert ex.main(["--pairs-dir", str(pairs), "--untrained", "--finetune-steps", "1", "--threads", "2"]) == 0
    assert "torchvision" not in sys.modules
    rows = list(csv.DictReader(open(tmp_path / "gradicon_results.csv")))
    assert [r["method"] for r in rows] == ["gradicon", "gradicon+io1"]
    for r in rows:
        assert all(
            np.isfinite(float(r[k]))
            for k in ("cartilage", "bone", "percent_folds_forward", "inverse_consistency_error_mm")
        )
    # no weights to be had: one line, exit 2, nothing written
    monkeypatch.setattr(ex, "CACHE", tmp_path / "cache" / "w.trch")
    monkeypatch.setattr(ex, "WEIGHTS_URL", (tmp_path / "missing.trch").as_uri())
    capsys.readouterr()
    assert ex.main(["--pairs-dir", str(pairs), "--out", str(tmp_path / "x.csv")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: pretrained weights cannot be downloaded")
    assert not (tmp_path / "x.csv").exists() and not (tmp_path / "cache" / "w.trch").exists()


def test_gross_failure_rule():
    assert knee.gross_failure(0.84)
    assert not knee.gross_failure(0.9)
    assert knee.gross_failure(0.88, affine_bone=0.92)  # the fields undid a better affine start
    assert not knee.gross_failure(0.91, affine_bone=0.92)  # within 0.02 of it: no loss to speak of
    assert not knee.gross_failure(0.93, affine_bone=0.92)
    assert knee.gross_failure(0.95, cartilage=0.29)  # bones in place, cartilage lost
    assert not knee.gross_failure(0.95, cartilage=0.31)
    assert not knee.gross_failure(0.93, affine_bone=float("nan"))


def test_self_check_table_judges_knees_where_the_moving_image_has_data(tmp_path, capsys):
    """A longitudinal knee whose moving field of view cuts the femur (bone Dice 0.69 over the
    whole fixed image, 0.995 in view, cartilage 0.98) is no gross failure of the verdict it
    got; bones below 0.85 in view are, and so is cartilage below 0.30. The benchmarks'
    stricter flag (the whole image, and bones more than 0.02 below the affine part's) is
    counted beside."""
    table = load_example("self_check_table")
    measures = json.dumps({"overlap_final": 0.9, "round_trip_fixed_mm": 1.0, "round_trip_limit_mm": 3.0,
                           "lncc_identity": 0.0, "lncc_affine": 0.5, "lncc_final": 0.6, "ncc_final": 0.95,
                           "nmi_final": 1.3, "nmi_identity": 1.0, "overlap_identity": 0.9,
                           "world_boxes_overlap": True, "percent_folds": 0.0})  # fmt: skip
    rows = [  # pair, bone, bone in view, cartilage (in view alike), affine bone
        ("cut", 0.69, 0.995, 0.98, 0.69),
        ("lost", 0.80, 0.80, 0.70, 0.85),
        ("cartilage", 0.95, 0.95, 0.25, 0.90),
        ("undid", 0.949, 0.949, 0.92, 0.988),
    ]
    path = tmp_path / "results.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["pair", "method", "bone", "bone_in_view", "cartilage", "cartilage_in_view", "affine_bone",
                    "gross_failure", "quality_measures", "percent_folds_forward", "error"])  # fmt: skip
        for pair, bone, in_view, cart, affine in rows:
            w.writerow([pair, "neuralreg", bone, in_view, cart, cart, affine, "", measures, 0.0, ""])
    judged = {r["pair"]: r for r in table.rows_of(path)}
    assert {k: r["gross"] for k, r in judged.items()} == {"cut": False, "lost": True, "cartilage": True, "undid": False}
    assert {k: r["gross_whole"] for k, r in judged.items()} == {k: True for k in judged}
    assert {r["verdict"] for r in judged.values()} == {"good"}
    assert "`good` on a gross failure: 2;" in table.table(list(judged.values()), "t")
    assert "4 gross failures, 4 of them `good`" in table.table(list(judged.values()), "t")


def test_realistic_pairs_keep_scanner_geometry(shared_data):
    files = sorted((shared_data / "oai_zib_labels").glob("*_labels.nii.gz"))
    pair = knee.realistic_pair(files[0], files[1], seed=0, shape=(40, 96, 96))
    fl, ml = pair["fixed_labels"], pair["moving_labels"]
    assert fl.shape != ml.shape  # fields of view differ
    assert not np.allclose(fl.affine, ml.affine)
    # oblique: the grid axes are not the world axes
    for lab in (fl, ml):
        cosines = np.abs(lab.affine[:3, :3] / np.linalg.norm(lab.affine[:3, :3], axis=0))
        assert cosines.max(0).min() < 0.999
    assert knee.physical_bone_dice(ml, fl) < 0.5  # the scanners' positions disagree
    # tissue intensities are the subject's own: the same tissue differs between the two images
    for key in ("fixed", "moving"):
        assert 0 <= float(pair[key].data.min()) and float(pair[key].data.max()) <= 1
    femur = [float(pair[k].data[pair[f"{k}_labels"].data == 1].mean()) for k in ("fixed", "moving")]
    background = [float(pair[k].data[pair[f"{k}_labels"].data == 0].mean()) for k in ("fixed", "moving")]
    assert abs(femur[0] - femur[1]) > 0.01 or abs(background[0] - background[1]) > 0.01
    assert set(torch.unique(ml.data).tolist()) >= {0, 1, 2, 3, 4}
