"""The ``neuralreg`` command line: register, warp, jacobian, evaluate, demo."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

from neuralreg.config import REGULARIZERS, SIMILARITIES, RegistrationConfig
from neuralreg.files import json_safe

_DEFAULTS = RegistrationConfig()


class CLIError(Exception):
    """A one-line error for the user."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: only where its help text does not already say it, and never 'None'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or action.default in (None, False, argparse.SUPPRESS):
            return text
        return super()._get_help_string(action)


def _add_register_options(p: argparse.ArgumentParser) -> None:
    d = _DEFAULTS
    p.add_argument("--similarity", choices=SIMILARITIES, help=f"similarity measure (default: {d.similarity})")
    p.add_argument("--regularizer", choices=REGULARIZERS, help=f"regularizer (default: {d.regularizer})")
    p.add_argument(
        "--lambda", dest="regularizer_weight", type=float, help=f"regularizer weight (default: {d.regularizer_weight})"
    )
    p.add_argument("--steps", type=int, help=f"optimization steps (default: {d.steps})")
    p.add_argument(
        "--points",
        type=int,
        help=f"similarity points per field and step (default: one per {d.voxels_per_point:g} fixed voxels, 4096-16384)",
    )
    p.add_argument("--learning-rate", type=float, help=f"Adam learning rate (default: {d.learning_rate})")
    p.add_argument(
        "--edge-fraction",
        type=float,
        help=f"share of similarity points drawn on image edges, the rest uniform (default: {d.edge_fraction})",
    )
    p.add_argument(
        "--edge-power",
        type=float,
        help="edge points are drawn by gradient magnitude to this power; below 1 weak edges count more "
        f"(default: {d.edge_power})",
    )
    p.add_argument(
        "--affine-steps",
        type=int,
        help=f"steps of the global affine part fitted first; 0 turns it off (default: {d.affine_steps})",
    )
    p.add_argument("--backend", choices=("auto", "torch", "native", "tcnn"), help="hash-grid backend (default: auto)")
    p.add_argument("--device", help=f"cpu, cuda or cuda:N (default: {d.device})")
    p.add_argument("--seed", type=int, help=f"random seed (default: {d.seed})")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--config", type=Path, help="JSON file of RegistrationConfig keys; flags given override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _check_options(args) -> None:
    """Numeric and device options, checked before anything is read or written (one line each)."""
    import math
    import re

    def finite(name, value, low=None, low_ok=True):
        if value is None:
            return
        if not math.isfinite(value):
            raise CLIError(f"{name} must be a finite number, not {value}")
        if low is not None and (value < low or (value == low and not low_ok)):
            raise CLIError(f"{name} must be {'>=' if low_ok else '>'} {low}, not {value}")

    finite("--lambda", getattr(args, "regularizer_weight", None), 0.0)
    finite("--learning-rate", getattr(args, "learning_rate", None), 0.0, low_ok=False)
    finite("--edge-fraction", getattr(args, "edge_fraction", None), 0.0)
    if getattr(args, "edge_fraction", None) is not None and args.edge_fraction > 1:
        raise CLIError(f"--edge-fraction must be in [0, 1], not {args.edge_fraction}")
    finite("--edge-power", getattr(args, "edge_power", None), 0.0, low_ok=False)
    if getattr(args, "edge_power", None) is not None and args.edge_power > 4:
        raise CLIError(f"--edge-power must be in (0, 4], not {args.edge_power}")
    for flag, key, low in (
        ("--steps", "steps", 1),
        ("--points", "points", 8),
        ("--affine-steps", "affine_steps", 0),
        ("--threads", "threads", 1),
        ("--workers", "workers", 1),
        ("--threads-per-worker", "threads_per_worker", 1),
    ):
        value = getattr(args, key, None)
        if value is not None and value < low:
            raise CLIError(f"{flag} must be at least {low}, not {value}")
    if getattr(args, "seed", None) is not None and args.seed < 0:
        raise CLIError(f"--seed must be >= 0, not {args.seed}")
    device = getattr(args, "device", None)
    if device is not None and not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise CLIError(f"--device must be cpu, cuda or cuda:N, not {device!r}")


def _build_config(args) -> RegistrationConfig:
    _check_options(args)
    base = _read_config(args.config).to_dict() if args.config else RegistrationConfig().to_dict()
    for key in (
        "similarity",
        "regularizer",
        "regularizer_weight",
        "steps",
        "points",
        "learning_rate",
        "edge_fraction",
        "edge_power",
        "affine_steps",
        "device",
        "seed",
    ):
        value = getattr(args, key, None)
        if value is not None:
            base[key] = value
    if getattr(args, "threads", None) is not None:
        base["threads"] = args.threads
    if getattr(args, "backend", None):
        base["field"]["backend"] = args.backend
    base["progress"] = not getattr(args, "quiet", False)
    try:
        return RegistrationConfig.from_dict(base)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"invalid option: {exc}") from None


def _read_config(path: Path) -> RegistrationConfig:
    """``--config``: a JSON object of ``RegistrationConfig`` keys; errors name the file."""
    if not path.is_file():
        raise CLIError(f"--config {path}: file not found")
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError) as exc:
        raise CLIError(f"--config {path}: cannot read it ({type(exc).__name__})") from None
    except ValueError as exc:
        raise CLIError(f"--config {path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise CLIError(f"--config {path}: expected a JSON object of RegistrationConfig keys")
    try:
        return RegistrationConfig.from_dict(data)
    except (TypeError, ValueError) as exc:
        raise CLIError(f"--config {path}: {exc}") from None


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not overwrite:
        raise CLIError(f"output {out} exists; pass --overwrite to replace it")


def _read_pair(args):
    from neuralreg.io import preprocess, read_image, read_labels, read_mask

    fixed = preprocess(read_image(args.fixed, "fixed image"), args.modality, tuple(args.ct_window))
    moving = preprocess(read_image(args.moving, "moving image"), args.modality, tuple(args.ct_window))
    if fixed.n_dims != moving.n_dims:
        raise CLIError(f"fixed image is {fixed.n_dims}D but moving image is {moving.n_dims}D")
    extras = {}
    for key, reader, image in (
        ("fixed_labels", read_labels, fixed),
        ("moving_labels", read_labels, moving),
        ("fixed_mask", read_mask, fixed),
        ("moving_mask", read_mask, moving),
    ):
        path = getattr(args, key)
        extras[key] = None
        if path is not None:
            img = reader(path, key.replace("_", " "))
            if img.shape != image.shape:
                raise CLIError(f"{key.replace('_', ' ')} {path} has shape {img.shape}, its image {image.shape}")
            extras[key] = img
    return fixed, moving, extras


def cmd_register(args) -> int:
    from neuralreg.optim.pair import register_pair
    from neuralreg.report.outputs import write_outputs

    cfg = _build_config(args)
    _check_device(cfg.device)
    _check_out(args.out, args.overwrite)
    fixed, moving, ex = _read_pair(args)
    t0 = time.perf_counter()
    reg = register_pair(moving, fixed, cfg, moving_mask=ex["moving_mask"], fixed_mask=ex["fixed_mask"])
    report = write_outputs(
        args.out,
        reg,
        moving,
        fixed,
        ex["moving_labels"],
        ex["fixed_labels"],
        extra_report={"inputs": {k: str(getattr(args, k)) for k in ("fixed", "moving")}},
        overwrite=args.overwrite,
    )
    _print_summary(report, time.perf_counter() - t0, args.out)
    return 0


def _print_summary(report: dict, seconds: float, out) -> None:
    lines = [f"registered in {seconds:.1f} s"]
    if "dice_after" in report:
        lines.append(f"Dice before {report['dice_before']['mean']:.4f} -> after {report['dice_after']['mean']:.4f}")
    lines.append(
        f"folds {report['percent_folds_forward']:.4f} % (forward), {report['percent_folds_inverse']:.4f} % (inverse)"
    )
    lines.append(f"inverse consistency error {report['inverse_consistency_error_mm']:.3f} mm")
    lines.append(f"outputs in {out}")
    print("\n".join(lines))
    _warn_quality(report.get("quality"))


def _warn_quality(quality: dict | None) -> None:
    """One stderr line when the self-check doubts the result (verdict in report.json)."""
    if not quality or quality.get("verdict") == "good":
        return
    head = "registration probably failed" if quality["verdict"] == "failed" else "check this registration"
    print(f"neuralreg: warning: {head}: {'; '.join(quality['reasons'])}", file=sys.stderr)


def _load_transform(args):
    """A transform (``map_points``, world mm), its default output grid, and the Registration if any."""
    from neuralreg.io import read_displacement_field
    from neuralreg.result import Registration

    if (args.registration is None) == (args.displacement is None):
        raise CLIError("give exactly one of --registration (registration.pt) and --displacement (NIfTI field)")
    if args.registration is not None:
        if not args.registration.is_file():
            raise CLIError(f"registration not found: {args.registration}")
        reg = Registration.load(args.registration)
        direction = args.direction
        return reg.transform(direction), reg._grid(direction), reg
    field = read_displacement_field(args.displacement)
    return field, (tuple(field.data.shape[:-1]), field.affine), None


def cmd_warp(args) -> int:
    import torch

    from neuralreg.geometry.transforms import resample
    from neuralreg.io import check_output_path, read_image, read_labels, write_image

    _check_out(args.out, args.overwrite)
    check_output_path(args.out, "--out")
    transform, grid, _ = _load_transform(args)
    img = read_labels(args.image) if args.interpolation == "nearest" else read_image(args.image)
    if args.reference is not None:
        ref = read_image(args.reference, "reference image")
        grid = (ref.shape, ref.affine)
    shape, affine = grid
    if len(shape) != img.n_dims:
        raise CLIError(f"image is {img.n_dims}D but the transform is {len(shape)}D")
    warped = resample(img, transform, (shape, affine), args.interpolation, dtype=torch.float64)
    if args.interpolation == "nearest":
        warped = warped.with_data(warped.data.round().to(torch.int32))
    write_image(warped, args.out)
    print(f"wrote {args.out}")
    return 0


def cmd_jacobian(args) -> int:
    import torch

    from neuralreg.geometry.image import Image
    from neuralreg.geometry.transforms import map_grid
    from neuralreg.io import check_output_path, write_image
    from neuralreg.metrics import jacobian_determinant, percent_folds

    _check_out(args.out, args.overwrite)
    check_output_path(args.out, "--out")
    transform, (shape, affine), _ = _load_transform(args)
    det = jacobian_determinant(map_grid(transform, shape, affine, dtype=torch.float64), affine).float()
    write_image(Image(det, affine), args.out)
    lo, hi = float(det.min()), float(det.max())
    print(f"wrote {args.out}; folds {percent_folds(det):.4f} %, det range [{lo:.3f}, {hi:.3f}]")
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from neuralreg.io import read_image, read_labels
    from neuralreg.metrics import dice, percent_folds

    a = read_labels(args.warped_labels, "warped label map")
    b = read_labels(args.reference_labels, "reference label map")
    if a.shape != b.shape:
        raise CLIError(f"label maps differ in shape: {a.shape} vs {b.shape}")
    try:
        labels = [int(x) for x in args.labels.split(",")] if args.labels else None
    except ValueError:
        raise CLIError(f"--labels must be comma-separated integers, not {args.labels!r}") from None
    result = {"dice": dice(a.data, b.data, labels)}
    if labels is not None:
        present = set(torch.unique(a.data).tolist()) | set(torch.unique(b.data).tolist())
        absent = [v for v in labels if v not in present]
        if absent:
            result["dice"]["absent_labels"] = absent
            print(f"neuralreg: warning: label(s) {', '.join(map(str, absent))} in neither map", file=sys.stderr)
    if args.jacobian is not None:
        result["percent_folds"] = percent_folds(read_image(args.jacobian, "Jacobian map").data)
    print(json.dumps(json_safe(result), indent=2, allow_nan=False))
    return 0


def cmd_demo(args) -> int:
    from neuralreg.metrics import dice
    from neuralreg.optim.pair import register_pair
    from neuralreg.phantoms import knee_phantom_pair
    from neuralreg.report.outputs import write_outputs

    _check_options(args)
    _check_out(args.out, args.overwrite)
    cfg = RegistrationConfig(
        steps=args.steps, points=4096, regularizer_points=1024, progress=not args.quiet, threads=args.threads
    )
    print("generating a knee-like phantom pair (femur, tibia, cartilage; known smooth deformation)")
    pair = knee_phantom_pair(args.seed)
    t0 = time.perf_counter()
    reg = register_pair(pair["moving"], pair["fixed"], cfg)
    seconds = time.perf_counter() - t0
    report = write_outputs(
        args.out,
        reg,
        pair["moving"],
        pair["fixed"],
        pair["moving_labels"],
        pair["fixed_labels"],
        overwrite=args.overwrite,
        extra_images={
            "fixed.nii.gz": pair["fixed"],
            "moving.nii.gz": pair["moving"],
            "fixed_labels.nii.gz": pair["fixed_labels"],
            "moving_labels.nii.gz": pair["moving_labels"],
        },
    )
    before = dice(reg.identity_warp(pair["moving_labels"], pair["fixed"]).data, pair["fixed_labels"].data, [2, 4])
    after = dice(reg.warp(pair["moving_labels"], mode="nearest").data, pair["fixed_labels"].data, [2, 4])
    print(f"cartilage Dice (femoral, tibial) before {before['mean']:.3f}, after {after['mean']:.3f}")
    _print_summary(report, seconds, args.out)
    return 0


def cmd_batch(args) -> int:
    from neuralreg.cli.batch import read_pairs, register_pairs

    # after Ctrl-C, multiprocessing's resource tracker (a process of its own, which takes
    # its warning options from this one) would print a 'leaked semaphore' warning
    sys.warnoptions.append("ignore::UserWarning:multiprocessing.resource_tracker")
    cfg = _build_config(args)
    _check_device(cfg.device)
    specs = read_pairs(args.pairs)
    rows = register_pairs(
        specs,
        args.out,
        cfg,
        scheduler=args.scheduler,
        workers=args.workers,
        threads_per_worker=args.threads_per_worker or args.threads,
        modality=args.modality,
        progress=not args.quiet,
    )
    done = sum(r["status"] == "done" for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    print(f"{done} registered, {skipped} already complete, {len(failed)} failed; summary in {args.out}/summary.csv")
    doubtful = [r for r in rows if r.get("quality") in ("failed", "check")]
    if doubtful:
        names = ", ".join(f"{r['pair_id']} ({r['quality']})" for r in doubtful)
        print(f"neuralreg: warning: {len(doubtful)} doubtful by the self-check: {names}", file=sys.stderr)
    for r in failed:
        print(f"  {r['pair_id']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="neuralreg",
        description="Pairwise image registration with neural fields and GradICON.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    fmt = _HelpFormatter

    r = sub.add_parser("register", help="register a moving image to a fixed image", formatter_class=fmt)
    r.add_argument("--fixed", type=Path, required=True, help="fixed image (.nii, .nii.gz, .png, .jpg)")
    r.add_argument("--moving", type=Path, required=True, help="moving image")
    r.add_argument("--out", type=Path, required=True, help="output folder (must not exist, see --overwrite)")
    r.add_argument("--fixed-labels", type=Path, help="fixed label map (integer), for Dice")
    r.add_argument("--moving-labels", type=Path, help="moving label map (integer), warped and scored")
    r.add_argument("--fixed-mask", type=Path, help="fixed mask: similarity points drawn inside it")
    r.add_argument("--moving-mask", type=Path, help="moving mask")
    r.add_argument(
        "--modality",
        choices=("mri", "ct", "none"),
        default="mri",
        help="intensity normalization: mri clips to [min, 99.9th percentile] -> [0, 1]; ct windows",
    )
    r.add_argument(
        "--ct-window",
        type=float,
        nargs=2,
        default=(40.0, 400.0),
        metavar=("CENTER", "WIDTH"),
        help="CT window in HU, with --modality ct",
    )
    r.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    _add_register_options(r)
    r.set_defaults(func=cmd_register)

    for name, func, helptext in (
        ("warp", cmd_warp, "apply a saved registration or displacement field to an image or label map"),
        ("jacobian", cmd_jacobian, "Jacobian determinant map of a saved registration or displacement field"),
    ):
        w = sub.add_parser(name, help=helptext, formatter_class=fmt)
        w.add_argument("--registration", type=Path, help="registration.pt written by register")
        w.add_argument("--displacement", type=Path, help="ITK/ANTs displacement field NIfTI")
        w.add_argument(
            "--direction",
            choices=("forward", "inverse"),
            default="forward",
            help="with --registration: forward maps fixed-space points to the moving space",
        )
        w.add_argument("--out", type=Path, required=True, help="output NIfTI file")
        w.add_argument("--overwrite", action="store_true", help="replace an existing output file")
        if name == "warp":
            w.add_argument("--image", type=Path, required=True, help="image or label map in the moving space")
            w.add_argument(
                "--interpolation",
                choices=("linear", "nearest"),
                default="linear",
                help="linear for intensities, nearest for label maps",
            )
            w.add_argument("--reference", type=Path, help="image whose grid the output takes (default: the field's)")
        w.set_defaults(func=func)

    b = sub.add_parser("batch", help="register every pair of a CSV/TSV table on Dask (resumable)", formatter_class=fmt)
    b.add_argument(
        "--pairs",
        type=Path,
        required=True,
        help="CSV/TSV: fixed, moving[, fixed_labels, moving_labels, fixed_mask, moving_mask, pair_id]",
    )
    b.add_argument("--out", type=Path, required=True, help="output folder (re-running skips completed pairs)")
    b.add_argument("--scheduler", help="address of an existing Dask scheduler (default: a local cluster)")
    b.add_argument("--workers", type=int, help="local workers (default: one per GPU, or about one per 2 cores)")
    b.add_argument("--threads-per-worker", type=int, help="torch threads per registration (default: cores/workers)")
    b.add_argument("--modality", choices=("mri", "ct", "none"), default="mri", help="intensity normalization")
    _add_register_options(b)
    b.set_defaults(func=cmd_batch)

    e = sub.add_parser(
        "evaluate", help="Dice (and folds) between a warped label map and a reference", formatter_class=fmt
    )
    e.add_argument("--warped-labels", type=Path, required=True, help="warped label map")
    e.add_argument("--reference-labels", type=Path, required=True, help="reference label map on the same grid")
    e.add_argument("--labels", help="comma-separated labels to score (default: all non-zero)")
    e.add_argument("--jacobian", type=Path, help="Jacobian determinant map: also report %% folds")
    e.set_defaults(func=cmd_evaluate)

    dm = sub.add_parser("demo", help="register a generated knee-like phantom pair", formatter_class=fmt)
    dm.add_argument("--out", type=Path, default=Path("neuralreg_demo"), help="output folder")
    dm.add_argument("--steps", type=int, default=300, help="optimization steps")
    dm.add_argument("--seed", type=int, default=0, help="phantom and optimization seed")
    dm.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    dm.add_argument("--quiet", action="store_true", help="no progress bar")
    dm.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    dm.set_defaults(func=cmd_demo)
    return parser


def _version() -> str:
    from neuralreg import __version__

    return f"neuralreg {__version__}"


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from neuralreg.errors import InputError, RegistrationDiverged, RegistrationFileError, RegistrationWarning
    from neuralreg.report.outputs import OutputExists

    # the self-check's verdict is printed once, from the report (``_warn_quality``)
    warnings.filterwarnings("ignore", category=RegistrationWarning)
    try:
        return args.func(args)
    except (CLIError, InputError, OutputExists, RegistrationDiverged, RegistrationFileError) as exc:
        print(f"neuralreg: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt as exc:
        message = str(exc) or "interrupted; no partial outputs were kept"
        print(f"neuralreg: {message}", file=sys.stderr)
        return 130
    except (ValueError, OSError) as exc:
        print(f"neuralreg: error: {exc}".splitlines()[0], file=sys.stderr)
    except Exception as exc:
        if os.environ.get("NEURALREG_DEBUG"):
            raise
        print(
            f"neuralreg: error: {type(exc).__name__}: {exc} (set NEURALREG_DEBUG=1 for a traceback)".splitlines()[0],
            file=sys.stderr,
        )
    return 2


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["build_parser", "main"]
