"""The IXI brain benchmark: whole commands, scored by mean DLMUSE-region Dice."""

import csv
import json

import pytest
from test_knee import load_example  # tests/eval is on sys.path (pytest prepend mode)

from neuralreg.io import read_labels
from neuralreg.metrics import dice
from neuralreg.result import Registration


@pytest.mark.slow
def test_brain_benchmark_scores_the_whole_command_and_beats_identity(shared_data, tmp_path):
    bench = load_example("brain_benchmark")
    out = tmp_path / "bb"
    config = tmp_path / "fast.json"
    config.write_text(json.dumps({"steps": 40, "points": 4096, "affine_steps": 40}))
    args = ["--out", str(out), "--pairs", "1", "--methods", "neuralreg", "--threads", "1", "--config", str(config)]
    assert bench.main(args) == 0
    (row,) = list(csv.DictReader(open(out / "results.csv")))
    pair = next((out / "pairs").iterdir())
    moving, fixed = read_labels(pair / "moving_labels.nii.gz"), read_labels(pair / "fixed_labels.nii.gz")
    regions = sorted(set(fixed.data.unique().tolist()) - {0})
    before = dice(Registration.identity_warp(moving, fixed).data, fixed.data, regions)["mean"]
    assert float(row["dice"]) > before + 0.1
    assert float(row["command_seconds"]) > float(row["seconds"]) > 0 and float(row["peak_memory_mb"]) > 50
    assert "| neuralreg | 1 |" in (out / "results.md").read_text()
    assert bench.main([*args, "--pairs", "9"]) == 2  # ten subjects make five pairs


@pytest.mark.parametrize("argv", [["--methods", "nope"], ["--pairs", "0"]])
def test_brain_benchmark_rejects_bad_arguments_in_one_line(shared_data, tmp_path, argv, capsys):
    bench = load_example("brain_benchmark")
    assert bench.main(["--out", str(tmp_path / "x"), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ")
