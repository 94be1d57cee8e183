"""OAI-protocol knee benchmark on pairs synthesized from the OAI-ZIB manual segmentations.

Each subject's label map is put on the half-resolution grid 80x192x192, an MR-like image
is synthesized from it (tissue intensities, textured background, bias field, blur,
noise), the moving knee is mirrored left-right when that overlaps the fixed bones better,
and every method registers every pair in its own process. One scoring for all: Dice of
femoral and tibial cartilage (their mean is the OAI score), bone Dice, % of fixed voxels
with negative Jacobian determinant, inverse-consistency error, seconds, CPU seconds and
peak memory per pair.

    python examples/knee_benchmark.py --out knee_results            # 10 pairs, all methods installed
    python examples/knee_benchmark.py --methods neuralreg --pairs 3 --out quick

Writes OUT/pairs/<id>/ (the synthesized pairs, reused on re-runs), OUT/results.csv (one
row per pair and method; finished rows are kept when re-run), OUT/results.md (per-pair
table, worst initial overlap first, and mean ± std) and OUT/cartilage_dice.png.
The data folder defaults to $NEURALREG_DATA/oai_zib_labels.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

METHOD_NAMES = ("neuralreg", "ants", "elastix")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="folder of *_labels.nii.gz (default: $NEURALREG_DATA/oai_zib_labels)")
    p.add_argument("--out", type=Path, required=True, help="results folder (created; re-runs resume)")
    p.add_argument("--pairs", type=int, default=10, help="number of pairs of different subjects (default: 10)")
    p.add_argument(
        "--methods",
        default="neuralreg,ants,elastix",
        help="comma-separated methods; baselines not installed are skipped with a note (default: all)",
    )
    p.add_argument("--threads", type=int, default=2, help="CPU threads per registration (default: 2)")
    p.add_argument("--steps", type=int, help="neuralreg steps (default: the package default)")
    p.add_argument("--config", type=Path, help="JSON of RegistrationConfig keys for neuralreg")
    p.add_argument("--shape", type=int, nargs=3, default=(80, 192, 192), help="registration grid (default: 80 192 192)")
    p.add_argument("--no-isolate", action="store_true", help="run in this process (no peak memory or CPU time)")
    return p.parse_args(argv)


def pair_list(n_subjects: int, n_pairs: int) -> list[tuple[int, int]]:
    """Pairs of different subjects: disjoint neighbours first, (0,1), (2,3), ..., then (1,2), (3,4), ..."""
    pairs = [(i, i + 1) for i in range(0, n_subjects - 1, 2)]
    pairs += [(i, i + 1) for i in range(1, n_subjects - 1, 2)]
    pairs += [(i, j) for i in range(n_subjects) for j in range(i + 2, n_subjects)]
    return pairs[:n_pairs]


def prepare_pair(files, i, j, folder: Path, shape, seed: int) -> dict:
    """Synthesize and write one pair (moving = subject j, fixed = subject i); return its facts."""
    import json

    from neuralreg import knee
    from neuralreg.io import write_image

    facts_path = folder / "pair.json"
    if facts_path.exists():
        return json.loads(facts_path.read_text())
    fixed_labels = knee.load_oai_labels(files[i], shape)
    moving_labels = knee.load_oai_labels(files[j], shape)
    flip = knee.choose_flip(moving_labels, fixed_labels)
    if flip:
        moving_labels = knee.flip_left_right(moving_labels)
    pair = knee.synthetic_pair(moving_labels, fixed_labels, seed)
    folder.mkdir(parents=True, exist_ok=True)
    for key in ("moving", "fixed"):
        write_image(pair[key], folder / f"{key}.nii.gz")
        write_image(pair[f"{key}_labels"], folder / f"{key}_labels.nii.gz")
    facts = {
        "fixed": files[i].name,
        "moving": files[j].name,
        "flipped": flip,
        "initial_bone": knee.bone_dice(moving_labels, fixed_labels),
        "initial_cartilage": knee.cartilage_dice(moving_labels.data, fixed_labels.data)["mean"],
    }
    facts_path.write_text(json.dumps(facts, indent=2))
    return facts


FIELDS = (
    "pair",
    "method",
    "initial_bone",
    "initial_cartilage",
    "femoral",
    "tibial",
    "cartilage",
    "bone",
    "percent_folds",
    "ice_mm",
    "seconds",
    "cpu_seconds",
    "peak_memory_mb",
    "error",
)


def main(argv=None) -> int:
    args = parse_args(argv)
    data = args.data or (
        Path(os.environ["NEURALREG_DATA"]) / "oai_zib_labels" if "NEURALREG_DATA" in os.environ else None
    )
    if data is None:
        return _fail("no data folder: pass --data or set NEURALREG_DATA")
    files = sorted(Path(data).glob("*_labels.nii.gz")) if Path(data).is_dir() else []
    if len(files) < 2:
        return _fail(f"{data} has fewer than two *_labels.nii.gz files")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHOD_NAMES]
    if unknown:
        return _fail(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(METHOD_NAMES)}")
    if args.pairs < 1:
        return _fail("--pairs must be at least 1")
    config = {}
    if args.config:
        import json

        try:
            config = json.loads(args.config.read_text())
        except (OSError, ValueError) as exc:
            return _fail(f"cannot read --config {args.config}: {exc}")
    if args.steps:
        config["steps"] = args.steps

    from tqdm.auto import tqdm

    from neuralreg import baselines, benchmark

    for m in [m for m in methods if m in baselines.BASELINES and not baselines.available(m)]:
        print(f"note: {m} is not installed (pip install 'neuralreg[baselines]'); skipped", file=sys.stderr)
        methods.remove(m)

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.csv"
    rows = _read_rows(results_path)
    done = {(r["pair"], r["method"]) for r in rows if not r.get("error")}
    rows = [r for r in rows if (r["pair"], r["method"]) in done]
    pairs = pair_list(len(files), args.pairs)
    with tqdm(total=len(pairs) * len(methods), desc="knee benchmark", dynamic_ncols=True) as bar:
        for k, (i, j) in enumerate(pairs):
            pair_id = f"{files[i].name.split('_')[0]}-{files[j].name.split('_')[0]}"
            facts = prepare_pair(files, i, j, args.out / "pairs" / pair_id, tuple(args.shape), seed=k)
            for m in methods:
                bar.set_postfix(pair=pair_id, method=m)
                if (pair_id, m) not in done:
                    row = {"pair": pair_id, "method": m, "initial_bone": facts["initial_bone"]}
                    row["initial_cartilage"] = facts["initial_cartilage"]
                    try:
                        row.update(
                            benchmark.run_method(
                                m, args.out / "pairs" / pair_id, config, args.threads, isolate=not args.no_isolate
                            )
                        )
                    except RuntimeError as exc:
                        row["error"] = str(exc)
                    rows.append(row)
                    _write_rows(results_path, rows)
                bar.update(1)
    summary = benchmark.summarize(rows, methods)
    table = benchmark.markdown_table(rows, summary)
    (args.out / "results.md").write_text(table)
    _figure(rows, methods, args.out / "cartilage_dice.png")
    print(table)
    failed = [r for r in rows if r.get("error")]
    return 1 if failed else 0


def _read_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, rows: list[dict]) -> None:
    from neuralreg.io import atomic_write

    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)


def _figure(rows, methods, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for ax, key, title in ((axes[0], "cartilage", "mean cartilage Dice"), (axes[1], "seconds", "seconds per pair")):
        data = [[float(r[key]) for r in rows if r["method"] == m and not r.get("error")] for m in methods]
        ax.boxplot(data, tick_labels=methods)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
