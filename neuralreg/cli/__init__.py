"""The ``neuralreg`` command line: register, warp, jacobian, evaluate, demo."""

from __future__ import annotations

import os

# OpenMP threads that spin while they wait collapse when another process holds one of their
# cores; they are also what makes a second thread pay on a small image. A run that shares
# its CPUs (RunConfig.share_cpus, the default) keeps libgomp's spin and drops threads while
# other processes are busy (optim/threads.py). A run that does not spins briefly instead: a
# knee phantom pair (80x192x192, --threads 2) beside one busy process, whole command
# (benchmarks/shared_cpu.py): libgomp's default spin 2.9x its time alone, 500 rounds 1.5x.
# The runtime reads its settings once, when torch loads it, so they are set here, before the
# imports below; a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT wins.
from neuralreg.cpus import available_cpus, shares_cpus_by_default  # imports no torch

if "OMP_WAIT_POLICY" not in os.environ and not shares_cpus_by_default():
    os.environ.setdefault("GOMP_SPINCOUNT", "500")

import argparse
import dataclasses
import json
import signal
import sys
import threading
import time
import typing
import warnings
from pathlib import Path

from neuralreg.config import RUN_KEYS, FieldConfig, RegistrationConfig, RunConfig, choices_of_hint
from neuralreg.errors import ConfigError
from neuralreg.files import json_safe


class CLIError(Exception):
    """A one-line error for the user."""


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows an option's default once: only where its help text does not already say it, and never 'None'."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "(default:" in text or any(action.default is v for v in (None, False, argparse.SUPPRESS)):
            return text
        return super()._get_help_string(action)


def _flagged_options():
    """(error key, dataclass field, type hint) of every option with a command-line flag
    (``config.flag``): the ``RegistrationConfig``'s, its field's (``field.<key>``) and the
    ``RunConfig``'s."""
    for owner, prefix in ((RegistrationConfig, ""), (FieldConfig, "field."), (RunConfig, "")):
        hints = typing.get_type_hints(owner)
        for f in dataclasses.fields(owner):
            if "flag" in f.metadata:
                yield prefix + f.name, f, hints[f.name]


def _add_register_options(p: argparse.ArgumentParser) -> None:
    """The flags of the config options that have one, their types, choices and defaults
    read from the dataclasses; ``--config`` and ``--quiet``."""
    for _, f, hint in _flagged_options():
        values = choices_of_hint(hint)
        kind = next((t for t in (*typing.get_args(hint), hint) if t in (int, float, str)), str)
        p.add_argument(
            f.metadata["flag"],
            dest=f.name,
            type=kind,
            choices=values or None,
            help=f.metadata["help"].format(default=f.default),
        )
    p.add_argument("--config", type=Path, help="JSON file of RegistrationConfig keys; flags given override it")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _add_intensity_options(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--modality",
        choices=("mri", "ct", "none"),
        default="mri",
        help="intensity normalization: mri clips to [min, 99.9th percentile] -> [0, 1]; ct windows",
    )
    p.add_argument(
        "--ct-window",
        type=float,
        nargs=2,
        default=(40.0, 400.0),
        metavar=("CENTER", "WIDTH"),
        help="CT window in HU, with --modality ct",
    )


def _check_options(args) -> None:
    """The options that are not ``RegistrationConfig`` keys, before anything is read or written."""
    import math

    for flag, key in (("--workers", "workers"), ("--threads-per-worker", "threads_per_worker")):
        value = getattr(args, key, None)
        if value is not None and value < 1:
            raise CLIError(f"{flag} must be at least 1, not {value}")
    window = getattr(args, "ct_window", None)
    if window is not None and not (all(math.isfinite(v) for v in window) and window[1] > 0):
        raise CLIError(f"--ct-window needs a finite CENTER and a WIDTH > 0, not {window[0]:g} {window[1]:g}")


def _config_error(exc: ConfigError, args, given: set) -> CLIError:
    """A ``ConfigError`` as one line naming the flag or the ``--config`` file that set the key."""
    message = str(exc).split(": ", 1)[1]
    if exc.key in given:
        flags = {key: f.metadata["flag"] for key, f, _ in _flagged_options()}
        return CLIError(f"{flags[exc.key]}: {message}")
    source = f"--config {args.config}: " if getattr(args, "config", None) else ""
    return CLIError(f"{source}{exc.key}: {message}")


def _build_config(args) -> tuple[RegistrationConfig, RunConfig]:
    """What the run optimizes (``--config``, if any, the flags given over it) and how it runs
    (the run flags, ``--quiet``), each checked once by its dataclass."""
    _check_options(args)
    base = _read_config(args.config).to_dict() if getattr(args, "config", None) else RegistrationConfig().to_dict()
    run: dict = {"progress": not getattr(args, "quiet", False)}
    given = set()
    for key, f, _ in _flagged_options():
        value = getattr(args, f.name, None)
        if value is None:
            continue
        given.add(key)
        if key.startswith("field."):
            base["field"][f.name] = value
        else:
            (run if key in RUN_KEYS else base)[key] = value
    try:
        return RegistrationConfig.from_dict(base), RunConfig.from_dict(run)
    except ConfigError as exc:
        raise _config_error(exc, args, given) from None


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
    except ConfigError as exc:
        raise CLIError(f"--config {path}: {exc}") from None


def _use_threads(threads: int | None) -> None:
    """``--threads`` for the whole command (reading and writing too, not only the registration);
    by default as many as the CPUs this process may use (affinity and cgroup quota)."""
    import torch

    torch.set_num_threads(threads or min(torch.get_num_threads(), available_cpus()))


def _check_device(device: str) -> None:
    import torch

    if device.startswith("cuda") and not torch.cuda.is_available():
        raise CLIError(f"--device {device} requested but no CUDA GPU is available; use --device cpu")
    if device.startswith("cuda:") and int(device[5:]) >= torch.cuda.device_count():
        raise CLIError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")


def cmd_register(args) -> int:
    from neuralreg.api import register_files

    cfg, run = _build_config(args)
    _check_device(run.device)
    _use_threads(run.threads)
    t0 = time.perf_counter()
    _, report = register_files(
        args.fixed,
        args.moving,
        args.out,
        cfg,
        run=run,
        fixed_labels=args.fixed_labels,
        moving_labels=args.moving_labels,
        fixed_mask=args.fixed_mask,
        moving_mask=args.moving_mask,
        modality=args.modality,
        ct_window=tuple(args.ct_window),
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
        direction = args.direction or "forward"
        return reg.transform(direction), reg._grid(direction), reg
    if args.direction is not None:
        raise CLIError(
            "--direction applies to --registration only: a displacement field maps one way "
            "(give the field of the direction you want)"
        )
    field = read_displacement_field(args.displacement)
    return field, (tuple(field.data.shape[:-1]), field.affine), None


def cmd_warp(args) -> int:
    import torch

    from neuralreg.geometry.transforms import resample
    from neuralreg.io import check_output_path, read_image, read_labels, write_image
    from neuralreg.io.folders import check_output_file

    check_output_path(args.out, "--out")
    inputs = (args.image, args.reference, args.registration, args.displacement)
    check_output_file(args.out, args.overwrite, inputs)
    transform, grid, _ = _load_transform(args)
    img = read_labels(args.image) if args.interpolation == "nearest" else read_image(args.image)
    transform_dims = len(grid[0])
    if args.reference is not None:
        ref = read_image(args.reference, "reference image")
        grid = (ref.shape, ref.affine)
    shape, affine = grid
    if len(shape) != img.n_dims or len(shape) != transform_dims:
        culprit = "--reference" if args.reference is not None and len(shape) != transform_dims else "--image"
        dims = len(shape) if culprit == "--reference" else img.n_dims
        raise CLIError(f"{culprit} is {dims}D but the transform is {transform_dims}D")
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
    from neuralreg.io.folders import check_output_file
    from neuralreg.metrics import jacobian_determinant, percent_folds

    check_output_path(args.out, "--out")
    check_output_file(args.out, args.overwrite, (args.registration, args.displacement))
    transform, (shape, affine), _ = _load_transform(args)
    det = jacobian_determinant(map_grid(transform, shape, affine, dtype=torch.float64), affine).float()
    write_image(Image(det, affine), args.out)
    lo, hi = float(det.min()), float(det.max())
    print(f"wrote {args.out}; folds {percent_folds(det):.4f} %, det range [{lo:.3f}, {hi:.3f}]")
    return 0


def cmd_evaluate(args) -> int:
    import torch

    from neuralreg.io import check_same_grid, read_image, read_labels
    from neuralreg.metrics import dice, percent_folds

    a = read_labels(args.warped_labels, "warped label map")
    b = read_labels(args.reference_labels, "reference label map")
    check_same_grid(a, b, f"warped label map {args.warped_labels}", f"the reference label map {args.reference_labels}")
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
        jac = read_image(args.jacobian, "Jacobian map")
        check_same_grid(jac, b, f"Jacobian map {args.jacobian}", f"the reference label map {args.reference_labels}")
        result["percent_folds"] = percent_folds(jac.data)
    print(json.dumps(json_safe(result), indent=2, allow_nan=False))
    return 0


def cmd_demo(args) -> int:
    from neuralreg.api import register_pair
    from neuralreg.io.folders import OutputFolder
    from neuralreg.metrics import dice
    from neuralreg.phantoms import knee_phantom_pair
    from neuralreg.report.outputs import write_outputs

    try:
        cfg = RegistrationConfig(steps=args.steps, points=4096, regularizer_points=1024, seed=args.seed)
        run = RunConfig(progress=not args.quiet, threads=args.threads)
    except ConfigError as exc:
        raise _config_error(exc, args, {"steps", "threads", "seed"}) from None
    _use_threads(run.threads)
    with OutputFolder(args.out, args.overwrite, kind="demo") as folder:
        print("generating a knee-like phantom pair (femur, tibia, cartilage; known smooth deformation)")
        pair = knee_phantom_pair(args.seed)
        t0 = time.perf_counter()
        reg = register_pair(pair["moving"], pair["fixed"], cfg, run=run)
        seconds = time.perf_counter() - t0
        report = write_outputs(
            folder,
            reg,
            pair["moving"],
            pair["fixed"],
            pair["moving_labels"],
            pair["fixed_labels"],
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
    cfg, run = _build_config(args)
    _check_device(run.device)
    specs = read_pairs(args.pairs)
    try:
        rows = register_pairs(
            specs,
            args.out,
            cfg,
            device=run.device,
            scheduler=args.scheduler,
            workers=args.workers,
            threads_per_worker=args.threads_per_worker or args.threads,
            modality=args.modality,
            progress=not args.quiet,
            ct_window=tuple(args.ct_window),
        )
    except KeyboardInterrupt as exc:
        if str(exc):
            raise
        raise KeyboardInterrupt(
            f"interrupted; the pairs finished are kept in {args.out}: re-run the same command to finish the rest"
        ) from None
    done = sum(r["status"] == "done" for r in rows)
    redone = sum(r["status"] == "done" and bool(r.get("redone")) for r in rows)
    skipped = sum(r["status"] == "skipped" for r in rows)
    failed = [r for r in rows if r["status"] == "failed"]
    again = f" ({redone} of them again: inputs or options changed)" if redone else ""
    print(
        f"{done} registered{again}, {skipped} already complete, {len(failed)} failed; summary in {args.out}/summary.csv"
    )
    doubtful = [r for r in rows if r.get("quality") in ("failed", "check")]
    if doubtful:
        names = ", ".join(f"{r['pair_id']} ({r['quality']})" for r in doubtful)
        print(f"neuralreg: warning: {len(doubtful)} doubtful by the self-check: {names}", file=sys.stderr)
    for r in failed:
        print(f"  {r['pair_id']}: {r['error']}", file=sys.stderr)
    return 1 if failed else 0


def build_parser() -> argparse.ArgumentParser:
    """The ``neuralreg`` parser: one sub-command per ``cmd_*`` function."""
    parser = argparse.ArgumentParser(
        prog="neuralreg",
        description="Pairwise image registration with neural fields and GradICON.",
        formatter_class=_HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=_version())
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_register_parser(sub)
    _add_transform_parsers(sub)
    _add_batch_parser(sub)
    _add_evaluate_parser(sub)
    _add_demo_parser(sub)
    return parser


def _overwrite_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--overwrite", action="store_true", help="replace an output folder neuralreg wrote (never anything else)"
    )


def _add_register_parser(sub) -> None:
    r = sub.add_parser("register", help="register a moving image to a fixed image", formatter_class=_HelpFormatter)
    r.add_argument("--fixed", type=Path, required=True, help="fixed image (.nii, .nii.gz, .png, .jpg)")
    r.add_argument("--moving", type=Path, required=True, help="moving image")
    r.add_argument("--out", type=Path, required=True, help="output folder (must not exist, see --overwrite)")
    r.add_argument("--fixed-labels", type=Path, help="fixed label map (integer), for Dice")
    r.add_argument("--moving-labels", type=Path, help="moving label map (integer), warped and scored")
    r.add_argument("--fixed-mask", type=Path, help="fixed mask: similarity points drawn inside it")
    r.add_argument("--moving-mask", type=Path, help="moving mask")
    _add_intensity_options(r)
    _overwrite_option(r)
    _add_register_options(r)
    r.set_defaults(func=cmd_register)


def _add_transform_parsers(sub) -> None:
    for name, func, helptext in (
        ("warp", cmd_warp, "apply a saved registration or displacement field to an image or label map"),
        ("jacobian", cmd_jacobian, "Jacobian determinant map of a saved registration or displacement field"),
    ):
        w = sub.add_parser(name, help=helptext, formatter_class=_HelpFormatter)
        w.add_argument("--registration", type=Path, help="registration.pt written by register")
        w.add_argument("--displacement", type=Path, help="ITK/ANTs displacement field NIfTI")
        w.add_argument(
            "--direction",
            choices=("forward", "inverse"),
            help="with --registration: forward (the default) maps fixed-space points to the moving space",
        )
        w.add_argument("--out", type=Path, required=True, help="output NIfTI file")
        w.add_argument("--overwrite", action="store_true", help="replace an output file neuralreg wrote")
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


def _add_batch_parser(sub) -> None:
    b = sub.add_parser(
        "batch", help="register every pair of a CSV/TSV table on Dask (resumable)", formatter_class=_HelpFormatter
    )
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
    _add_intensity_options(b)
    _add_register_options(b)
    b.set_defaults(func=cmd_batch)


def _add_evaluate_parser(sub) -> None:
    e = sub.add_parser(
        "evaluate", help="Dice (and folds) between a warped label map and a reference", formatter_class=_HelpFormatter
    )
    e.add_argument("--warped-labels", type=Path, required=True, help="warped label map")
    e.add_argument("--reference-labels", type=Path, required=True, help="reference label map on the same grid")
    e.add_argument("--labels", help="comma-separated labels to score (default: all non-zero)")
    e.add_argument("--jacobian", type=Path, help="Jacobian determinant map: also report %% folds")
    e.set_defaults(func=cmd_evaluate)


def _add_demo_parser(sub) -> None:
    dm = sub.add_parser("demo", help="register a generated knee-like phantom pair", formatter_class=_HelpFormatter)
    dm.add_argument("--out", type=Path, default=Path("neuralreg_demo"), help="output folder")
    dm.add_argument("--steps", type=int, default=300, help="optimization steps")
    dm.add_argument("--seed", type=int, default=0, help="phantom and optimization seed")
    dm.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's choice)")
    dm.add_argument("--quiet", action="store_true", help="no progress bar")
    _overwrite_option(dm)
    dm.set_defaults(func=cmd_demo)


def _version() -> str:
    from neuralreg.version import __version__

    return f"neuralreg {__version__}"


_SHOW_WARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None):
    """neuralreg's own warnings as one ``neuralreg: warning:`` line; others as Python shows them."""
    from neuralreg.errors import NativeBuildWarning

    if issubclass(category, NativeBuildWarning):
        print(f"neuralreg: warning: {message}", file=sys.stderr)
    else:
        _SHOW_WARNING(message, category, filename, lineno, file, line)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised where the program is, so that the same clean-up as for Ctrl-C runs."""


def _on_sigterm(signum, frame):
    raise Terminated("terminated; no partial outputs were kept")


def main(argv=None) -> int:
    """The command: one line on stderr for every error, exit status 0, 1 (batch: a pair
    failed), 2 (error), 130 (Ctrl-C) or 143 (SIGTERM). The warning filters, the SIGTERM
    handler and the thread count it sets are undone on return, for callers that run it in
    their own process."""
    parser = build_parser()
    args = parser.parse_args(argv)
    import torch

    from neuralreg.errors import RegistrationWarning

    previous, threads = None, torch.get_num_threads()
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with warnings.catch_warnings():
            # the self-check's verdict is printed once, from the report (``_warn_quality``)
            warnings.filterwarnings("ignore", category=RegistrationWarning)
            warnings.showwarning = _show_warning
            return _run(args)
    finally:
        torch.set_num_threads(threads)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _run(args) -> int:
    """``args.func(args)`` with every error turned into one line and an exit status."""
    from neuralreg.errors import InputError, RegistrationDiverged, RegistrationFileError

    try:
        return args.func(args)
    except (CLIError, InputError, ConfigError, RegistrationDiverged, RegistrationFileError) as exc:
        print(f"neuralreg: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt as exc:
        message = str(exc) or "interrupted; no partial outputs were kept"
        print(f"neuralreg: {message}", file=sys.stderr)
        return 143 if isinstance(exc, Terminated) else 130
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
