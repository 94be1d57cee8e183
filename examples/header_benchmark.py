"""Real scans against deformed copies of themselves under other headers: the answer is known.

Two families from ``$NEURALREG_DATA``: the IXI T1 heads (with their DLMUSE labels) and the
real DESS knee (box-averaged to 256x256x80). Each pair is a scan and a copy pulled through
a smooth random deformation (up to 4 mm) with new noise, whose header is rotated by up to
30 degrees about a random axis and offset by up to 50 mm per axis
(``neuralreg_eval.headers``). Every method runs as its whole command on the pair's files
and is scored against the true map: mean and 95th-percentile error (mm) inside the body,
label Dice (IXI), gross failure when the mean error exceeds 4 mm, and neuralreg's verdict.
With ``--contrast`` every moving scan is also put in another contrast: its intensities
pass through a random curve that is not monotonic (``headers.remap_contrast``), so
tissues swap order between the two images as between fat-suppressed, T1 and T2 scans.

    python examples/header_benchmark.py --out header_results                 # 20 IXI + 20 DESS pairs
    python examples/header_benchmark.py --out quick --ixi 2 --dess 2 --methods neuralreg
    python examples/header_benchmark.py --out other_contrast --contrast   # the moving scans in another contrast

Writes OUT/pairs/<id>/ (reused on re-runs), OUT/results.csv (finished rows are kept when
re-run) and OUT/results.md (per family and method: means, gross failures, verdicts).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
from pathlib import Path

try:
    from neuralreg_eval import benchmark, headers
except ImportError:
    sys.exit("error: this example needs the evaluation package: pip install -e ./eval (in a neuralreg checkout)")

FIELDS = (
    "pair",
    "family",
    "method",
    "error_mm",
    "error_p95_mm",
    "dice",
    "gross_failure",
    "quality",
    "quality_measures",
    "percent_folds_forward",
    "command_seconds",
    "seconds",
    "error",
)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="the shared data folder (default: $NEURALREG_DATA)")
    p.add_argument("--out", type=Path, required=True, help="results folder (created; re-runs resume)")
    p.add_argument("--ixi", type=int, default=20, help="IXI pairs (two per head; default: 20)")
    p.add_argument("--dess", type=int, default=20, help="DESS knee pairs (default: 20)")
    p.add_argument("--methods", default="neuralreg,ants", help="comma-separated methods (default: neuralreg,ants)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads per registration (default: 2)")
    p.add_argument("--config", type=Path, help="JSON of RegistrationConfig keys for neuralreg")
    p.add_argument(
        "--contrast",
        action="store_true",
        help="the moving scans in another contrast (a random non-monotonic intensity curve; families ixi-contrast, "
        "dess-contrast)",
    )
    return p.parse_args(argv)


def _write(pair: dict, folder: Path) -> None:
    from neuralreg.geometry.image import Image
    from neuralreg.io import write_displacement_field, write_image

    folder.mkdir(parents=True, exist_ok=True)
    for key in ("moving", "fixed"):
        write_image(pair[key], folder / f"{key}.nii.gz")
        if pair[f"{key}_labels"] is not None:
            write_image(pair[f"{key}_labels"], folder / f"{key}_labels.nii.gz")
    write_displacement_field(pair["truth"], pair["fixed"].affine, folder / "truth.nii.gz")
    write_image(Image(pair["body"].to(pair["fixed"].data.dtype), pair["fixed"].affine), folder / "body.nii.gz")
    (folder / "pair.json").write_text(json.dumps({"ready": True}))


def prepare(data: Path, out: Path, n_ixi: int, n_dess: int, contrast: bool = False) -> list[tuple[str, str, Path]]:
    """(pair id, family, folder) of every pair, synthesized on first use (``contrast``: the
    moving scans in another contrast, ``headers.perturbed_pair``)."""
    tag = "-contrast" if contrast else ""
    from neuralreg_eval.brain import image_files

    from neuralreg.io import read_image, read_labels

    pairs = []
    ixi = image_files(data / "ixi_brains")
    for k in range(n_ixi if ixi else 0):
        img, lab = ixi[k % len(ixi)]
        pid = f"ixi{tag}-{img.name.split('-')[0]}-{k // len(ixi)}"
        folder = out / "pairs" / pid
        if not (folder / "pair.json").exists():
            pair = headers.perturbed_pair(read_image(img), read_labels(lab), seed=100 + k, contrast=contrast)
            _write(pair, folder)
        pairs.append((pid, f"ixi{tag}", folder))
    dess_path = data / "dess_knee" / "dess_echo01.nii.gz"
    dess = None
    for k in range(n_dess if dess_path.exists() else 0):
        pid = f"dess{tag}-{k:02d}"
        folder = out / "pairs" / pid
        if not (folder / "pair.json").exists():
            if dess is None:
                from neuralreg_eval.knee import resample_to_shape

                dess = resample_to_shape(read_image(dess_path), (256, 256, 80))
            _write(headers.perturbed_pair(dess, None, seed=200 + k, contrast=contrast), folder)
        pairs.append((pid, f"dess{tag}", folder))
    return pairs


def _scorer(forward, inverse, affine_only, pair_dir):
    return headers.score_maps(forward, inverse, pair_dir)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data or (Path(os.environ["NEURALREG_DATA"]) if "NEURALREG_DATA" in os.environ else None)
    if data is None or not data.is_dir():
        print("error: no data folder: pass --data or set NEURALREG_DATA", file=sys.stderr)
        return 2
    try:
        methods, config = benchmark.methods_and_config(args.methods, args.config, ("neuralreg", "ants"))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from tqdm.auto import tqdm

    args.out.mkdir(parents=True, exist_ok=True)
    results = args.out / "results.csv"
    rows = list(csv.DictReader(open(results))) if results.exists() else []
    done = {(r["pair"], r["method"]) for r in rows if not r.get("error")}
    rows = [r for r in rows if (r["pair"], r["method"]) in done]
    pairs = prepare(data, args.out, args.ixi, args.dess, args.contrast)
    with tqdm(total=len(pairs) * len(methods), desc="header benchmark", dynamic_ncols=True) as bar:
        for pid, family, folder in pairs:
            for m in methods:
                if (pid, m) not in done:
                    row = {"pair": pid, "family": family, "method": m}
                    try:
                        keep = args.out / "registrations" / f"{pid}.pt"
                        row.update(benchmark.run_method(m, folder, config, args.threads, scorer=_scorer, keep=keep))
                    except RuntimeError as exc:
                        row["error"] = str(exc)
                    rows.append(row)
                    with open(results, "w", newline="") as f:
                        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
                        w.writeheader()
                        w.writerows(rows)
                bar.update(1)
    table = summary_table(rows)
    (args.out / "results.md").write_text(table)
    print(table)
    return 1 if any(r.get("error") for r in rows) else 0


def summary_table(rows: list[dict]) -> str:
    """Per family and method: pairs, mean error, mean 95th percentile, mean Dice, gross failures, verdicts."""
    lines = [
        "| family | method | pairs | error mm | p95 mm | Dice | gross failures | good / check / failed | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    keys = sorted({(r["family"], r["method"]) for r in rows if not r.get("error")})
    for family, method in keys:
        sel = [r for r in rows if r["family"] == family and r["method"] == method and not r.get("error")]

        def mean(key, sel=sel):
            vals = [float(r[key]) for r in sel if r.get(key) not in (None, "", "nan")]
            return f"{sum(vals) / len(vals):.3f}" if vals else "-"

        gross = sum(str(r["gross_failure"]) == "True" for r in sel)
        verdicts = "/".join(str(sum(r.get("quality") == v for r in sel)) for v in ("good", "check", "failed"))
        lines.append(
            f"| {family} | {method} | {len(sel)} | {mean('error_mm')} | {mean('error_p95_mm')} | {mean('dice')} | "
            f"{gross} | {verdicts if method == 'neuralreg' else '-'} | {mean('command_seconds')} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
