"""OAI-protocol knee benchmark on pairs synthesized from the OAI-ZIB manual segmentations.

Each subject's label map is put on the half-resolution grid 80x192x192, an MR-like image
is synthesized from it (tissue intensities, textured background, bias field, blur,
noise), the moving knee is mirrored left-right when that overlaps the fixed bones better,
and every method registers every pair in its own process. One scoring for all: Dice of
femoral and tibial cartilage (their mean is the OAI score), bone Dice, % of fixed voxels
with negative Jacobian determinant, inverse-consistency error; and time: each method runs
as the whole command a user starts (``neuralreg register`` writing all its outputs; a
baseline's runner reading, registering and writing its maps), whose wall seconds, CPU
seconds and peak memory are reported, beside the registration call's seconds alone.
Baselines: ANTs SyN and elastix (``pip install -e './eval[baselines]'``), FireANTs
(``pip install fireants``).

    python examples/knee_benchmark.py --out knee_results            # 10 pairs, all methods installed
    python examples/knee_benchmark.py --methods neuralreg --pairs 3 --out quick

Writes OUT/pairs/<id>/ (the synthesized pairs, reused on re-runs), OUT/results.csv (one
row per pair and method; finished rows are kept when re-run), OUT/results.md (per-pair
table, worst initial overlap first, and mean ± std, with the gross failures counted) and
OUT/cartilage_dice.png (cartilage Dice, bone Dice per pair against the gross-failure line,
seconds).

``--geometry realistic`` keeps each scan's own oblique affine and table offset, then
gives each image its own extra rotation (up to 20 degrees), world offset (up to 50 mm per
axis), size (0.9-1.1) and field of view (each axis cropped or padded by up to 15 %), and
soft tissue of its own (muscle, fat in layers, skin, air), bias field, blur and noise: the
hard benchmark. ``--geometry filled`` and ``--geometry contrast`` are two more families
(``neuralreg_eval.families``): soft tissue to the edge of the field of view and cut bones,
and each image with its own fat contrast, the moving one in thick slices.
``--longitudinal N`` adds N pairs of one knee scanned twice (same tissue, own pose, field
of view and noise). A pair is a gross failure when its bone Dice after registration is
below 0.85 or below its affine stage's alone, or its cartilage Dice below 0.30.
The data folder defaults to $NEURALREG_DATA/oai_zib_labels.
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from pathlib import Path

try:
    import neuralreg_eval  # noqa: F401  (the knee protocol and the baselines live there)
except ImportError:
    sys.exit("error: this example needs the evaluation package: pip install -e ./eval (in a neuralreg checkout)")

METHOD_NAMES = ("neuralreg", "ants", "elastix", "fireants")


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
    p.add_argument(
        "--threads",
        type=int,
        default=2,
        help="CPU threads per registration (default: 2); with two runners at once on 2 cores use 1 each "
        "(a 2-thread neuralreg beside a 1-thread ANTs ran 6x slower)",
    )
    p.add_argument("--steps", type=int, help="neuralreg steps (default: the package default)")
    p.add_argument("--config", type=Path, help="JSON of RegistrationConfig keys for neuralreg")
    p.add_argument("--shape", type=int, nargs=3, default=(80, 192, 192), help="registration grid (default: 80 192 192)")
    p.add_argument(
        "--geometry",
        choices=("canonical", "realistic", "filled", "contrast"),
        default="canonical",
        help="canonical: every label map on one axis-aligned grid at the origin (the OAI protocol); realistic: "
        "each scan keeps its own oblique affine and table offset, then gets its own extra rotation (up to 20 deg), "
        "world offset (up to 50 mm per axis), size and field of view, and subject-specific soft tissue "
        "(default: canonical); filled, contrast: see above",
    )
    p.add_argument(
        "--longitudinal",
        type=int,
        default=0,
        help="also register this many pairs of one knee scanned twice (not with --geometry canonical; default: 0)",
    )
    p.add_argument(
        "--no-isolate",
        action="store_true",
        help="run the registration calls in this process (the Python API on the images as read: no whole-command "
        "time, no peak memory)",
    )
    return p.parse_args(argv)


def pair_list(n_subjects: int, n_pairs: int) -> list[tuple[int, int]]:
    """Pairs of different subjects: disjoint neighbours first, (0,1), (2,3), ..., then (1,2), (3,4), ..."""
    pairs = [(i, i + 1) for i in range(0, n_subjects - 1, 2)]
    pairs += [(i, i + 1) for i in range(1, n_subjects - 1, 2)]
    pairs += [(i, j) for i in range(n_subjects) for j in range(i + 2, n_subjects)]
    return pairs[:n_pairs]


def prepare_pair(files, i, j, folder: Path, shape, seed: int, geometry: str = "canonical") -> dict:
    """Synthesize and write one pair (moving = subject j, fixed = subject i); return its facts."""
    import json

    from neuralreg_eval import knee

    from neuralreg.io import write_image

    facts_path = folder / "pair.json"
    if facts_path.exists():
        return json.loads(facts_path.read_text())
    if geometry != "canonical":
        from neuralreg_eval import families

        pair = families.family_pair(geometry, files[i], files[j], seed, shape)
        flip, moving_labels, fixed_labels = pair["flipped"], pair["moving_labels"], pair["fixed_labels"]
    else:
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
        "flipped": bool(flip),
        "geometry": geometry,
        "longitudinal": i == j,
        "initial_bone": knee.physical_bone_dice(moving_labels, fixed_labels),
    }
    facts_path.write_text(json.dumps(facts, indent=2))
    return facts


FIELDS = (
    "pair",
    "method",
    "initial_bone",
    "femoral",
    "tibial",
    "cartilage",
    "bone",
    "bone_in_view",
    "cartilage_in_view",
    "affine_bone",
    "affine_bone_in_view",
    "gross_failure",
    "gross_failure_in_view",
    "quality",
    "quality_measures",
    "percent_folds_forward",
    "inverse_consistency_error_mm",
    "field_correction_mm",
    "command_seconds",
    "command_cpu_seconds",
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
    if args.pairs < 1:
        return _fail("--pairs must be at least 1")
    from neuralreg_eval import benchmark
    from tqdm.auto import tqdm

    try:
        methods, config = benchmark.methods_and_config(args.methods, args.config, METHOD_NAMES)
    except ValueError as exc:
        return _fail(str(exc))
    if args.steps:
        config["steps"] = args.steps

    args.out.mkdir(parents=True, exist_ok=True)
    results_path = args.out / "results.csv"
    rows = _read_rows(results_path)
    done = {(r["pair"], r["method"]) for r in rows if not r.get("error")}
    rows = [r for r in rows if (r["pair"], r["method"]) in done]
    if args.longitudinal and args.geometry == "canonical":
        return _fail("--longitudinal needs --geometry realistic, filled or contrast")
    pairs = pair_list(len(files), args.pairs) + [(i, i) for i in range(min(args.longitudinal, len(files)))]
    with tqdm(total=len(pairs) * len(methods), desc="knee benchmark", dynamic_ncols=True) as bar:
        for k, (i, j) in enumerate(pairs):
            pair_id = f"{files[i].name.split('_')[0]}-{files[j].name.split('_')[0]}"
            if i == j:
                pair_id += "-longitudinal"
            facts = prepare_pair(files, i, j, args.out / "pairs" / pair_id, tuple(args.shape), k, args.geometry)
            for m in methods:
                bar.set_postfix(pair=pair_id, method=m)
                if (pair_id, m) not in done:
                    row = {"pair": pair_id, "method": m, "initial_bone": facts["initial_bone"]}
                    try:
                        row.update(
                            benchmark.run_method(
                                m,
                                args.out / "pairs" / pair_id,
                                config,
                                args.threads,
                                isolate=not args.no_isolate,
                                keep=args.out / "registrations" / f"{pair_id}.pt",
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
    """Cartilage Dice per method, bone Dice per pair (gross-failure line at 0.85), seconds per pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from neuralreg_eval.knee import GROSS_FAILURE_BONE_DICE

    ok = [r for r in rows if not r.get("error")]
    pairs = sorted({r["pair"] for r in ok}, key=lambda p: min(float(r["initial_bone"]) for r in ok if r["pair"] == p))
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8), gridspec_kw={"width_ratios": [1, 2.2, 1]})
    for ax, key, title in (
        (axes[0], "cartilage", "mean cartilage Dice"),
        (axes[2], "command_seconds", "whole command, s per pair"),
    ):
        # rows of older runs have no command time: their registration call's
        data = [[float(r.get(key) or r["seconds"]) for r in ok if r["method"] == m] for m in methods]
        ax.boxplot(data, tick_labels=methods)
        ax.set_title(title)
        ax.grid(alpha=0.3)
    ax = axes[1]
    x = range(len(pairs))
    initial = [next(float(r["initial_bone"]) for r in ok if r["pair"] == p) for p in pairs]
    ax.plot(x, initial, "k.", label="before (physical alignment)")
    for m, marker in zip(methods, "os^v", strict=False):
        by_pair = {r["pair"]: float(r["bone"]) for r in ok if r["method"] == m}
        ax.plot([i for i, p in enumerate(pairs) if p in by_pair], [by_pair[p] for p in pairs if p in by_pair],
                marker, label=m, alpha=0.8)  # fmt: skip
    ax.axhline(GROSS_FAILURE_BONE_DICE, color="r", lw=0.8, ls="--", label="gross failure below")
    ax.set_xticks(list(x), [p.replace("-", "-\n") for p in pairs], fontsize=6)
    ax.set_ylim(0, 1.02)
    ax.set_title("bone Dice per pair (worst start first)")
    ax.legend(fontsize=7, loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fail(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
