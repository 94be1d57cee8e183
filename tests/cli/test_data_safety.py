"""neuralreg deletes or replaces only what it wrote (issue 27, defects 1-4 and 11).

Each test puts a user's files where a careless tool would destroy them (the inputs and a
note inside ``--out``, a subject folder named like a pair, a ``summary.csv`` of theirs) and
checks they are intact, byte for byte, after every command that could reach them.
"""

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from neuralreg.cli import main
from neuralreg.io import write_image
from neuralreg.io.folders import MANIFEST, OutputFolder, try_lock, write_manifest
from neuralreg.phantoms import triangles_pair

FAST = ["--steps", "6", "--points", "256", "--affine-steps", "4", "--quiet", "--threads", "1"]


def _snapshot(folder: Path) -> dict:
    """Every file below ``folder`` with its bytes."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def data(tmp_path):
    """A user's folder: two images and a note."""
    d = tmp_path / "d"
    d.mkdir()
    pair = triangles_pair(5, size=40)
    write_image(pair["fixed"], d / "b1.nii.gz")
    write_image(pair["moving"], d / "b2.nii.gz")
    (d / "notes.txt").write_text("my notes\n")
    return d


def _ok(capsys, code):
    """A command that succeeded; its output read away so the next check sees only its own."""
    out = capsys.readouterr()
    assert code == 0, out.err
    return out.out


def _one_line(capsys, code, message):
    err = capsys.readouterr().err
    assert code == 2, err
    assert err.count("\n") == 1 and err.startswith("neuralreg: error:") and message in err, err
    return err


# 1. --overwrite removed the whole --out folder, the inputs in it included
def test_overwrite_never_deletes_inputs_or_foreign_files(data, capsys):
    before = _snapshot(data)
    argv = ["register", "--fixed", str(data / "b1.nii.gz"), "--moving", str(data / "b2.nii.gz"), *FAST]
    _one_line(capsys, main([*argv, "--out", str(data), "--overwrite"]), "holds the input")
    assert _snapshot(data) == before
    # a folder holding only a foreign file (the inputs elsewhere) is refused too
    other = data.parent / "other"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    _one_line(capsys, main([*argv, "--out", str(other), "--overwrite"]), "holds files neuralreg did not write")
    assert (other / "notes.txt").read_text() == "keep me" and _snapshot(data) == before


def test_out_is_never_the_working_directory(data, capsys, monkeypatch):
    monkeypatch.chdir(data)
    before = _snapshot(data)
    argv = ["register", "--fixed", "b1.nii.gz", "--moving", "b2.nii.gz", *FAST, "--overwrite"]
    for out in (".", "", ".."):
        _one_line(capsys, main([*argv, "--out", out]), "is the working directory or holds it")
    assert _snapshot(data) == before


def test_overwrite_replaces_only_a_folder_neuralreg_wrote(data, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["register", "--fixed", str(data / "b1.nii.gz"), "--moving", str(data / "b2.nii.gz"), *FAST, "--out"]
    _ok(capsys, main([*argv, str(out)]))
    manifest = json.loads((out / MANIFEST).read_text())
    assert set(manifest["files"]) == {p.name for p in out.iterdir()} - {MANIFEST}
    _one_line(capsys, main([*argv, str(out)]), "exists; pass --overwrite")
    _ok(capsys, main([*argv, str(out), "--overwrite"]))  # ours: replaced
    (out / "mine.txt").write_text("added by the user")
    _one_line(capsys, main([*argv, str(out), "--overwrite"]), "'mine.txt'")
    assert (out / "mine.txt").read_text() == "added by the user" and (out / "report.json").is_file()
    # an empty folder made beforehand holds nothing to lose: written without --overwrite
    empty = tmp_path / "empty"
    empty.mkdir()
    _ok(capsys, main([*argv, str(empty)]))
    assert (empty / "report.json").is_file()
    # nothing is left beside the folders: no lock, no temporary, no set-aside old folder
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d", "empty", "out"]


def test_a_second_run_on_the_same_folder_stops_at_once(data, tmp_path, capsys):
    """3. Two runs on one --out: the second says so instead of both claiming the folder."""
    out = tmp_path / "out"
    with OutputFolder(out) as folder:  # a run holding the folder, as during its registration
        code = main(
            ["register", "--fixed", str(data / "b1.nii.gz"), "--moving", str(data / "b2.nii.gz"), *FAST]
            + ["--out", str(out)]
        )
        _one_line(capsys, code, "another neuralreg run is writing")
        folder.commit(lambda tmp: (tmp / "report.json").write_text("{}"))
    assert (out / "report.json").read_text() == "{}"  # the first run's result, whole


def test_stale_temporaries_of_a_killed_run_are_removed_only_if_ours(data, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.tmp-dead"
    stale.mkdir()
    (stale / "warped.nii.gz").write_bytes(b"partial")
    write_manifest(stale, "registration", complete=False)
    look_alike = tmp_path / ".out.tmp-mine"
    look_alike.mkdir()
    (look_alike / "x").write_text("mine")
    set_aside = tmp_path / ".out.old-kept"  # a complete folder set aside, and a NIfTI it does not list
    set_aside.mkdir()
    (set_aside / "report.json").write_text("{}")
    write_manifest(set_aside, "registration")
    (set_aside / "mine.nii.gz").write_text("mine")
    crafted = tmp_path / ".out.tmp-crafted"  # neuralreg's manifest, but a file neuralreg never writes
    crafted.mkdir()
    write_manifest(crafted, "registration", complete=False)
    (crafted / "thesis.docx").write_text("mine")
    argv = ["register", "--fixed", str(data / "b1.nii.gz"), "--moving", str(data / "b2.nii.gz"), *FAST]
    _ok(capsys, main([*argv, "--out", str(out)]))
    assert not stale.exists() and (look_alike / "x").read_text() == "mine"
    assert (crafted / "thesis.docx").read_text() == "mine"
    assert (set_aside / "mine.nii.gz").read_text() == "mine"


def test_sigterm_while_writing_leaves_no_temporary(tmp_path):
    """11. SIGTERM during the output writing: the temporary folder is removed, --out is whole or absent.

    The signal is sent as soon as the temporary folder appears (or when the command ends,
    on a machine too fast to see it): either way nothing half-written may remain.
    """
    out = tmp_path / "out"
    proc = subprocess.Popen(
        [sys.executable, "-m", "neuralreg", "demo", "--out", str(out), "--steps", "20", "--quiet", "--threads", "1"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = False
    while proc.poll() is None:
        if list(tmp_path.glob(".out.tmp-*")):
            seen = True
            proc.send_signal(signal.SIGTERM)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=300)
    assert not list(tmp_path.glob(".out.*")), "a temporary folder or lock was left behind"
    if seen and proc.returncode != 0:
        assert proc.returncode == 143 and "Traceback" not in err, err
        assert err.strip() == "neuralreg: terminated; no partial outputs were kept", err
        assert not out.exists()
    else:
        assert proc.returncode == 0 and (out / "report.json").is_file()


# 2. batch replaced any pair folder without a report.json: subject folders of a data root
def test_batch_never_touches_a_data_root(data, tmp_path, capsys):
    pytest.importorskip("distributed", reason="pip install 'dask[distributed]'")
    root = tmp_path / "root"
    for subject, image in (("s1", "b1.nii.gz"), ("s2", "b2.nii.gz")):
        (root / subject).mkdir(parents=True)
        (root / subject / "img.nii.gz").write_bytes((data / image).read_bytes())
        (root / subject / "notes.txt").write_text(f"{subject} notes")
    table = root / "pairs.csv"
    table.write_text("pair_id,fixed,moving\ns1,s1/img.nii.gz,s2/img.nii.gz\ns2,s2/img.nii.gz,s1/img.nii.gz\n")
    before = _snapshot(root)
    argv = ["batch", "--pairs", str(table), "--out", str(root), "--workers", "1", *FAST]
    _one_line(capsys, main(argv), "holds s1, s2, not written by neuralreg")
    assert _snapshot(root) == before
    # other pair_ids: the batch writes beside the subjects and touches none of them
    table.write_text("pair_id,fixed,moving\np1,s1/img.nii.gz,s2/img.nii.gz\n")
    before = _snapshot(root)
    (root / "summary.csv").write_text("the user's own summary\n")
    _one_line(capsys, main(argv), "holds summary.csv, not written by neuralreg")
    (root / "summary.csv").unlink()
    _ok(capsys, main(argv))
    after = _snapshot(root)
    assert {k: v for k, v in after.items() if k in before} == before
    assert (root / "p1" / "report.json").is_file() and (root / "summary.csv").is_file()
    _ok(capsys, main(argv))  # a re-run: the summary is neuralreg's now, and is rewritten


# 4. resume ignored changed options and changed inputs
@pytest.mark.slow
def test_batch_resume_redoes_what_changed_and_says_how_many(data, tmp_path, capsys):
    pytest.importorskip("distributed", reason="pip install 'dask[distributed]'")
    d = tmp_path / "cohort"
    d.mkdir()
    for i in range(2):
        pair = triangles_pair(30 + i, size=40)
        write_image(pair["fixed"], d / f"f{i}.nii.gz")
        write_image(pair["moving"], d / f"m{i}.nii.gz")
    (d / "pairs.csv").write_text("pair_id,fixed,moving\np0,f0.nii.gz,m0.nii.gz\np1,f1.nii.gz,m1.nii.gz\n")
    out = tmp_path / "out"
    argv = ["batch", "--pairs", str(d / "pairs.csv"), "--out", str(out), "--workers", "1", *FAST]

    def run(*extra):
        text = _ok(capsys, main([*argv, *extra]))
        with open(out / "summary.csv") as f:
            rows = {r["pair_id"]: r for r in csv.DictReader(f)}
        return text, {k: (r["status"], r["redone"]) for k, r in rows.items()}

    text, rows = run()
    assert rows == {"p0": ("done", ""), "p1": ("done", "")}
    text, rows = run()
    assert rows == {"p0": ("skipped", ""), "p1": ("skipped", "")} and "2 already complete" in text
    text, rows = run("--similarity", "ncc")  # other options: every pair again
    assert rows == {"p0": ("done", "options changed"), "p1": ("done", "options changed")}
    assert "2 registered (2 of them again: inputs or options changed)" in text
    report = json.loads((out / "p0" / "report.json").read_text())
    assert report["options"]["similarity"] == "ncc" and report["inputs"]["fixed"]["sha256"]
    write_image(triangles_pair(99, size=40)["moving"], d / "m1.nii.gz")  # p1's moving image replaced
    text, rows = run("--similarity", "ncc")
    assert rows == {"p0": ("skipped", ""), "p1": ("done", "inputs changed")}
    assert "1 registered (1 of them again" in text and "1 already complete" in text
    text, rows = run("--similarity", "ncc", "--threads", "2")  # how it runs is no reason to redo it
    assert rows == {"p0": ("skipped", ""), "p1": ("skipped", "")}


def test_batch_holds_a_lock_and_refuses_reserved_or_hidden_pair_ids(tmp_path, capsys):
    pytest.importorskip("distributed", reason="pip install 'dask[distributed]'")
    from neuralreg.cli.batch import read_pairs

    for pair_id in (".x.tmp-y", "summary.csv", "-x"):
        (tmp_path / "t.csv").write_text(f"pair_id,fixed,moving\n{pair_id},a.nii,b.nii\n")
        with pytest.raises(ValueError, match="must start with a letter or digit"):
            read_pairs(tmp_path / "t.csv")
    (tmp_path / "t.csv").write_text("pair_id,fixed,moving\np,a.nii,b.nii,extra\n")
    with pytest.raises(ValueError, match=r"row 1 of .* has more fields than its header"):
        read_pairs(tmp_path / "t.csv")
    out = tmp_path / "out"
    out.mkdir()
    pair = triangles_pair(1, size=40)
    write_image(pair["fixed"], tmp_path / "a.nii.gz")
    write_image(pair["moving"], tmp_path / "b.nii.gz")
    (tmp_path / "t.csv").write_text("pair_id,fixed,moving\np,a.nii.gz,b.nii.gz\n")
    lock = try_lock(out.resolve())
    try:
        code = main(["batch", "--pairs", str(tmp_path / "t.csv"), "--out", str(out), *FAST])
        _one_line(capsys, code, "another neuralreg batch is writing")
    finally:
        lock.release()
    assert os.listdir(out) == []


def test_a_crafted_manifest_cannot_reach_out_of_its_folder(data, tmp_path, capsys):
    """A manifest that lists '../notes.txt' is no manifest of neuralreg's: the folder is foreign."""
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "notes.txt").write_text("outside")
    (out / "report.json").write_text("{}")
    (out / MANIFEST).write_text(
        json.dumps({"written_by": "neuralreg", "complete": True, "files": ["report.json", "../notes.txt"]})
    )
    argv = ["register", "--fixed", str(data / "b1.nii.gz"), "--moving", str(data / "b2.nii.gz"), *FAST]
    _one_line(capsys, main([*argv, "--out", str(out), "--overwrite"]), "holds files neuralreg did not write")
    assert (tmp_path / "notes.txt").read_text() == "outside" and (out / "report.json").exists()


def test_a_file_of_the_users_named_like_the_lock_is_never_removed(data, tmp_path, capsys):
    out = tmp_path / "out"
    theirs = tmp_path / ".out.neuralreg-lock"
    theirs.write_text("the user's")
    argv = ["register", "--fixed", str(data / "b1.nii.gz"), "--moving", str(data / "b2.nii.gz"), *FAST]
    _ok(capsys, main([*argv, "--out", str(out)]))
    assert theirs.read_text() == "the user's" and (out / "report.json").is_file()
    _ok(capsys, main([*argv, "--out", str(tmp_path / "other")]))
    assert not (tmp_path / ".other.neuralreg-lock").exists()  # neuralreg's own lock file is removed
