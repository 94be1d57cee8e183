"""Cohort registration on a Dask LocalCluster: failures recorded, resume, same numbers as register."""

import csv
import json

import numpy as np
import pytest

pytest.importorskip("distributed", reason="pip install 'dask[distributed]'")

from neuralreg import RegistrationConfig
from neuralreg.cli import main
from neuralreg.cli.batch import read_pairs, register_pairs
from neuralreg.io import write_image
from neuralreg.phantoms import triangles_pair

CONFIG = dict(steps=15, points=512, regularizer_points=128, seed=3)


@pytest.fixture(scope="module")
def table(tmp_path_factory):
    d = tmp_path_factory.mktemp("cohort")
    rows = []
    for i in range(3):
        pair = triangles_pair(10 + i, size=40)
        for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
            write_image(pair[key], d / f"{key}{i}.nii.gz")
        rows.append(
            {
                "pair_id": f"p{i}",
                "fixed": f"fixed{i}.nii.gz",
                "moving": f"moving{i}.nii.gz",
                "fixed_labels": f"fixed_labels{i}.nii.gz",
                "moving_labels": f"moving_labels{i}.nii.gz",
            }
        )
    rows.append(
        {
            "pair_id": "broken",
            "fixed": "fixed0.nii.gz",
            "moving": "missing.nii.gz",
            "fixed_labels": "",
            "moving_labels": "",
        }
    )
    with open(d / "pairs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return d / "pairs.csv"


@pytest.mark.slow
def test_batch_records_failures_resumes_and_matches_register(table, tmp_path):
    out = tmp_path / "out"
    cfg = RegistrationConfig(**CONFIG)
    rows = register_pairs(table, out, cfg, workers=2, threads_per_worker=1, progress=False)
    status = {r["pair_id"]: r for r in rows}
    assert {k: v["status"] for k, v in status.items()} == {"p0": "done", "p1": "done", "p2": "done", "broken": "failed"}
    assert "not found" in status["broken"]["error"]
    assert not (out / "broken").exists()
    for i in range(3):
        assert (out / f"p{i}" / "report.json").is_file() and (out / f"p{i}" / "warped_labels.nii.gz").is_file()
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert [r["pair_id"] for r in summary] == ["broken", "p0", "p1", "p2"]
    assert (out / "summary.png").stat().st_size > 0

    # interrupted-run semantics: completed folders are skipped, a removed one is redone
    import shutil

    shutil.rmtree(out / "p1")
    again = {r["pair_id"]: r for r in register_pairs(table, out, cfg, workers=2, threads_per_worker=1, progress=False)}
    assert again["p0"]["status"] == "skipped" and again["p2"]["status"] == "skipped"
    assert again["p1"]["status"] == "done"
    assert again["p1"]["dice_after"] == pytest.approx(status["p1"]["dice_after"], abs=0)

    # the same numbers as a sequential `neuralreg register` with the same seed and threads
    single = tmp_path / "single"
    d = table.parent
    code = main(
        [
            "register",
            "--fixed",
            str(d / "fixed0.nii.gz"),
            "--moving",
            str(d / "moving0.nii.gz"),
            "--fixed-labels",
            str(d / "fixed_labels0.nii.gz"),
            "--moving-labels",
            str(d / "moving_labels0.nii.gz"),
            "--out",
            str(single),
            "--steps",
            "15",
            "--points",
            "512",
            "--seed",
            "3",
            "--threads",
            "1",
            "--quiet",
            "--config",
            str(_config_file(tmp_path)),
        ]
    )
    assert code == 0
    ref = json.loads((single / "report.json").read_text())
    got = json.loads((out / "p0" / "report.json").read_text())
    assert got["dice_after"]["mean"] == ref["dice_after"]["mean"]
    assert got["final_loss_terms"]["loss"] == ref["final_loss_terms"]["loss"]
    np.testing.assert_array_equal(_nii(out / "p0" / "warped.nii.gz"), _nii(single / "warped.nii.gz"))


def _config_file(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"regularizer_points": 128}))
    return path


def _nii(path):
    import nibabel as nib

    return np.asarray(nib.load(path).dataobj)


def test_bad_tables_are_one_line_errors(tmp_path, capsys):
    bad = tmp_path / "bad.csv"
    bad.write_text("fixed,movingg\na.nii,b.nii\n")
    code = main(["batch", "--pairs", str(bad), "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "lacks column" in err
    dup = tmp_path / "dup.tsv"
    dup.write_text("pair_id\tfixed\tmoving\nx\ta.nii\tb.nii\nx\ta.nii\tb.nii\n")
    with pytest.raises(ValueError, match="twice"):
        read_pairs(dup)
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_existing_scheduler_address(table, tmp_path):
    from distributed import LocalCluster

    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        rows = register_pairs(
            table,
            tmp_path / "out",
            RegistrationConfig(**CONFIG),
            scheduler=cluster.scheduler_address,
            threads_per_worker=1,
            progress=False,
        )
    assert sorted(r["status"] for r in rows) == ["done", "done", "done", "failed"]


@pytest.mark.slow
def test_incomplete_folders_are_recomputed_and_stale_temporaries_removed(table, tmp_path):
    from neuralreg.io.folders import write_manifest

    out = tmp_path / "out"
    out.mkdir()
    (out / "p0").mkdir()  # an empty folder: nothing to lose, not complete
    (out / "p1").mkdir()
    (out / "p1" / "report.json").write_text("{truncated")  # neuralreg's folder with an unreadable report
    write_manifest(out / "p1", "registration")
    stale = out / ".p2.tmp-abc123"  # left by a killed run: its manifest says neuralreg wrote it
    stale.mkdir()
    (stale / "warped.nii.gz").write_bytes(b"partial")
    write_manifest(stale, "registration", complete=False)
    look_alike = out / ".p2.tmp-user"  # the same name pattern, not neuralreg's: kept
    look_alike.mkdir()
    (look_alike / "data.txt").write_text("mine")
    specs = [s for s in read_pairs(table) if s.pair_id != "broken"]
    rows = {
        r["pair_id"]: r for r in register_pairs(specs, out, RegistrationConfig(**CONFIG), workers=1, progress=False)
    }
    assert {k: r["status"] for k, r in rows.items()} == {"p0": "done", "p1": "done", "p2": "done"}
    assert not stale.exists()
    assert (look_alike / "data.txt").read_text() == "mine"
    for pid in ("p0", "p1"):
        assert json.loads((out / pid / "report.json").read_text())["dice_after"]["mean"] > 0
    again = register_pairs(specs, out, RegistrationConfig(**CONFIG), workers=1, progress=False)
    assert {r["status"] for r in again} == {"skipped"}
    with open(out / "summary.csv") as f:
        summary = list(csv.DictReader(f))
    assert {r["quality"] for r in summary} <= {"good", "check", "failed"} and all(r["quality"] for r in summary)


def _interrupt_table(tmp_path, n=10):
    """A table whose first pair fails at once (a missing file) and whose others take seconds each."""
    rows = ["q0,fixed1.nii.gz,missing.nii.gz"]
    for i in range(1, n):
        pair = triangles_pair(20 + i, size=40)
        for key in ("fixed", "moving"):
            write_image(pair[key], tmp_path / f"{key}{i}.nii.gz")
        rows.append(f"q{i},fixed{i}.nii.gz,moving{i}.nii.gz")
    (tmp_path / "pairs.csv").write_text("pair_id,fixed,moving\n" + "\n".join(rows) + "\n")
    return tmp_path / "pairs.csv"


def _summary_rows(path):
    try:
        with open(path) as f:
            return list(csv.DictReader(f))
    except OSError:
        return []


@pytest.mark.slow
def test_ctrl_c_gives_one_line_stops_workers_and_keeps_a_summary(tmp_path):
    """Ctrl-C once the summary lists a pair: the interrupt is sent while the next pairs run.

    The summary is rewritten after every pair, so the test waits for the first row (a pair
    that fails at once) rather than racing a registration: on a loaded machine the pairs
    after it still take seconds each, far longer than the Ctrl-C needs to arrive.
    """
    import os
    import signal
    import subprocess
    import sys
    import time

    table = _interrupt_table(tmp_path)
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuralreg", "batch", "--pairs", str(table), "--out", str(out)]
        + ["--workers", "1", "--threads-per-worker", "1", "--steps", "300", "--points", "512", "--quiet"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,  # its own process group, as a terminal's foreground job
    )
    deadline = time.time() + 600
    while time.time() < deadline and not _summary_rows(out / "summary.csv") and proc.poll() is None:
        time.sleep(0.2)
    assert _summary_rows(out / "summary.csv"), "no summary row in time"
    os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C: the whole foreground group gets SIGINT
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 130, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("neuralreg: interrupted:"), err
    assert "summary" in lines[0] and "Traceback" not in err
    summary = _summary_rows(out / "summary.csv")
    finished = {p.parent.name for p in out.glob("q*/report.json")}
    assert len(finished) < 9, "every pair finished: the Ctrl-C did not stop the batch"
    assert {r["pair_id"] for r in summary if r["status"] == "done"} == finished
    assert {r["pair_id"]: r["status"] for r in summary}["q0"] == "failed"
