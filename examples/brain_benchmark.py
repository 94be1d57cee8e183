"""Brain benchmark on the real IXI T1 heads of ``$NEURALREG_DATA/ixi_brains`` (120x120x90, 2 mm,
skull on, not aligned): pairs of different subjects, every method as the whole command a
user runs, in its own process, scored alike by the mean Dice over the ~148 automatic
DLMUSE regions of the fixed subject (labels only score; no method sees them), % folds and
inverse-consistency error; wall and CPU seconds and peak memory of the whole command.

    python examples/brain_benchmark.py --out brain_results                 # 5 pairs, neuralreg and ANTs SyN
    python examples/brain_benchmark.py --out quick --pairs 1 --methods neuralreg

Pair k registers subject 2k+1 (moving) onto subject 2k (fixed), names sorted. Writes
OUT/pairs/<id>/ (copies of the pair), OUT/results.csv (re-runs resume) and OUT/results.md.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

try:
    import neuralreg_eval  # noqa: F401
except ImportError:
    sys.exit("error: this example needs the evaluation package: pip install -e ./eval (in a neuralreg checkout)")

METHOD_NAMES = ("neuralreg", "ants", "elastix", "fireants")
FIELDS = (
    "pair",
    "method",
    "dice",
    "percent_folds_forward",
    "inverse_consistency_error_mm",
    "quality",
    "quality_measures",
    "command_seconds",
    "command_cpu_seconds",
    "seconds",
    "cpu_seconds",
    "peak_memory_mb",
    "error",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="the ixi_brains folder (default: $NEURALREG_DATA/ixi_brains)")
    p.add_argument("--out", type=Path, required=True, help="results folder (created; re-runs resume)")
    p.add_argument("--pairs", type=int, default=5, help="number of pairs (default: 5, all ten subjects)")
    p.add_argument("--methods", default="neuralreg,ants", help="comma-separated (default: neuralreg,ants)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per command (default: 2)")
    p.add_argument("--config", type=Path, help="JSON of RegistrationConfig keys for neuralreg")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data or (Path(os.environ["NEURALREG_DATA"]) / "ixi_brains" if "NEURALREG_DATA" in os.environ else None)
    if data is None:
        return _fail("no data folder: pass --data or set NEURALREG_DATA")
    from neuralreg_eval import benchmark, brain

    files = brain.image_files(data)
    if len(files) < 2:
        return _fail(f"{data} has fewer than two images with DLMUSE labels")
    if not 1 <= args.pairs <= len(files) // 2:
        return _fail(f"--pairs must be between 1 and {len(files) // 2}")
    try:
        methods, config = benchmark.methods_and_config(args.methods, args.config, METHOD_NAMES)
    except ValueError as exc:
        return _fail(str(exc))
    from tqdm.auto import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "results.csv"
    rows = list(csv.DictReader(open(path, newline=""))) if path.exists() else []
    rows = [r for r in rows if not r.get("error")]
    done = {(r["pair"], r["method"]) for r in rows}
    with tqdm(total=args.pairs * len(methods), desc="brain benchmark", dynamic_ncols=True) as bar:
        for k in range(args.pairs):
            i, j = 2 * k, 2 * k + 1
            pair_id = f"{files[i][0].name.split('-')[0]}-{files[j][0].name.split('-')[0]}"
            folder = brain.prepare_pair(files, i, j, args.out / "pairs" / pair_id)
            for m in methods:
                bar.set_postfix(pair=pair_id, method=m)
                if (pair_id, m) not in done:
                    row = {"pair": pair_id, "method": m}
                    try:
                        row.update(benchmark.run_method(m, folder, config, args.threads, scorer=brain.scorer))
                    except RuntimeError as exc:
                        row["error"] = str(exc)
                    rows.append(row)
                    _write(path, rows)
                bar.update(1)
    table = _table(rows, methods)
    (args.out / "results.md").write_text(table)
    print(table)
    return 1 if any(r.get("error") for r in rows) else 0


def _write(path: Path, rows: list[dict]) -> None:
    from neuralreg.io import atomic_write

    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _table(rows: list[dict], methods) -> str:
    import numpy as np

    def cell(r, k, digits):
        v = r.get(k)
        return "n/a" if v in (None, "") or np.isnan(float(v)) else f"{float(v):.{digits}f}"

    lines = [
        "| pair | method | mean Dice | % neg. Jacobian | ICE mm | verdict | command s | command CPU s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (r["pair"], r["method"])):
        if r.get("error"):
            lines.append(f"| {r['pair']} | {r['method']} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['pair']} | {r['method']} | {cell(r, 'dice', 3)} | {cell(r, 'percent_folds_forward', 4)} | "
            f"{cell(r, 'inverse_consistency_error_mm', 2)} | {r.get('quality') or '-'} | "
            f"{cell(r, 'command_seconds', 1)} | {cell(r, 'command_cpu_seconds', 1)} | {cell(r, 'peak_memory_mb', 0)} |"
        )
    lines += ["", "| method | pairs | mean Dice | % neg. Jacobian | command s / pair | command CPU s / pair |"]
    lines.append("|---|---|---|---|---|---|")
    for m in methods:
        ok = [r for r in rows if r["method"] == m and not r.get("error")]
        if ok:
            mean = {k: np.mean([float(r[k]) for r in ok]) for k in ("dice", "percent_folds_forward")}
            sec = {k: np.mean([float(r[k]) for r in ok]) for k in ("command_seconds", "command_cpu_seconds")}
            std = np.std([float(r["dice"]) for r in ok])
            lines.append(
                f"| {m} | {len(ok)} | {mean['dice']:.3f} ± {std:.3f} | {mean['percent_folds_forward']:.4f} | "
                f"{sec['command_seconds']:.1f} | {sec['command_cpu_seconds']:.1f} |"
            )
    return "\n".join(lines) + "\n"


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
