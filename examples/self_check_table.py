"""The self-check against the truth: neuralreg's verdicts beside gross failures, from benchmark results.

Reads the ``results.csv`` of ``examples/knee_benchmark.py`` or ``examples/header_benchmark.py``
runs (neuralreg rows, whose ``quality_measures`` column holds the self-check's measures),
judges every row again with the installed ``neuralreg.quality.judge`` (so a new rule is
measured on results already computed) and prints, per results file and in all:

- the confusion table: verdict (good / check / failed) against gross failure (yes / no);
- the two rates the rule is held to: ``good`` given to a gross failure (must be 0), and
  good registrations (bone Dice >= 0.90, or for header pairs no gross failure) called
  ``failed`` (at most 10 %).

A knee row is a gross failure here when its bone Dice is below 0.85 or its cartilage Dice
below 0.30, scored where the moving image has data (``bone_in_view``,
``cartilage_in_view`` where the run wrote them): bone that the moving scan's field of view
cuts off cannot be placed by any method. The benchmarks' own flag (``gross_failure``:
over the whole fixed image, and also where the fields left the bones more than 0.02 below
the affine part's) is stricter; its count is printed beside.

    python examples/self_check_table.py knee_filled/results.csv header_results/results.csv
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

from neuralreg_eval import knee

from neuralreg.quality import judge

VERDICTS = ("good", "check", "failed")


def rows_of(path: Path) -> list[dict]:
    """neuralreg rows with measures: {"gross": bool, "good_result": bool, "verdict": str, "pair": str}."""
    out = []
    for r in csv.DictReader(open(path)):
        if r.get("method") != "neuralreg" or not r.get("quality_measures") or r.get("error"):
            continue
        measures = json.loads(r["quality_measures"])
        if r.get("percent_folds_forward") not in (None, ""):
            measures.setdefault("percent_folds", float(r["percent_folds_forward"]))
        gross = whole = str(r.get("gross_failure")) == "True"
        bone = r.get("bone")
        if bone not in (None, "") and r.get("cartilage") not in (None, ""):  # the knee rule of the installed eval
            affine = float(r["affine_bone"]) if r.get("affine_bone") not in (None, "") else float("nan")
            whole = knee.gross_failure(float(bone), affine, float(r["cartilage"]))
            cartilage = r["cartilage"]
            if r.get("bone_in_view") not in (None, "") and r.get("cartilage_in_view") not in (None, ""):
                # where the moving image has data: bone its field of view cuts off cannot be placed
                bone, cartilage = r["bone_in_view"], r["cartilage_in_view"]
            gross = knee.gross_failure(float(bone), cartilage=float(cartilage))  # the lines alone
        good_result = float(bone) >= 0.90 if bone not in (None, "") else not gross
        verdict = judge(measures).verdict
        out.append(
            {"pair": r["pair"], "gross": gross, "gross_whole": whole, "good_result": good_result, "verdict": verdict}
        )
    return out


def table(rows: list[dict], title: str) -> str:
    lines = [f"{title}: {len(rows)} registrations", "", "| | good | check | failed |", "|---|---|---|---|"]
    for gross in (True, False):
        sel = [r for r in rows if r["gross"] == gross]
        counts = " | ".join(str(sum(r["verdict"] == v for r in sel)) for v in VERDICTS)
        lines.append(f"| gross failure: {'yes' if gross else 'no'} | {counts} |")
    good_on_gross = sum(r["verdict"] == "good" for r in rows if r["gross"])
    good_on_whole = sum(r["verdict"] == "good" for r in rows if r["gross_whole"])
    good = [r for r in rows if r["good_result"]]
    failed_on_good = sum(r["verdict"] == "failed" for r in good)
    share = 100.0 * failed_on_good / len(good) if good else 0.0
    lines += [
        "",
        f"`good` on a gross failure: {good_on_gross}; good registrations called `failed`: "
        f"{failed_on_good} of {len(good)} ({share:.0f} %); by the benchmarks' stricter flag (the whole fixed "
        f"image, and bone Dice more than 0.02 below the affine part's counts too): "
        f"{sum(r['gross_whole'] for r in rows)} gross failures, {good_on_whole} of them `good`",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", type=Path, nargs="+", help="results.csv files of benchmark runs")
    args = p.parse_args(argv)
    everything = []
    for path in args.results:
        if not path.is_file():
            print(f"error: {path}: no such file", file=sys.stderr)
            return 2
        rows = rows_of(path)
        everything += rows
        print(table(rows, str(path)))
    if len(args.results) > 1:
        print(table(everything, "all"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
