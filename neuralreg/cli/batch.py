"""Cohort registration: many pairs on Dask distributed, resumable and fault tolerant.

``register_pairs(pairs_csv, out_dir)`` registers every row of a CSV/TSV (columns
``fixed``, ``moving`` and optionally ``fixed_labels``, ``moving_labels``, ``fixed_mask``,
``moving_mask``, ``pair_id``; relative paths are relative to the table's folder) into
``out_dir/<pair_id>/``, exactly as ``neuralreg register`` writes a folder, then writes
``summary.csv`` and ``summary.png`` (Dice and folds distributions).

- Execution: an embedded ``LocalCluster`` sized to the machine (one worker per GPU with a
  ``GPU`` resource, or a few single-task CPU workers with the cores split between them),
  or an existing cluster given by its scheduler address (e.g. one started by
  dask-jobqueue on SLURM).
- Safe: a pair folder is written by ``neuralreg.api.register_files`` (whole or not at all,
  see ``neuralreg.io.folders``); an existing one is replaced only if neuralreg wrote it.
  A table whose pair folders, ``summary.csv`` or ``summary.png`` exist without being
  neuralreg's is refused before anything runs, and two batches on one folder do not run
  at once (a lock).
- Resumable: each pair's ``report.json`` records its inputs (path, size, SHA-256) and the
  options that shape the result (the config less how it runs: device, threads,
  progress; the modality and CT window). A pair whose folder is complete with the same
  inputs and options is skipped; one whose inputs or options changed is registered
  again (``redone`` in the summary says why). A pair that fails (bad file, divergence) is
  recorded with its error in the summary and does not stop the others.
- Interruptible: ``summary.csv`` is rewritten after every pair, so it always lists the
  pairs finished so far; Ctrl-C (or SIGTERM through the CLI) stops the workers (they
  ignore the terminal's SIGINT, so they print nothing), writes the summary and raises
  ``BatchInterrupted``.
- Self-checked: each pair's quality verdict (``neuralreg.quality``) and its reasons are
  columns of the summary.
"""

from __future__ import annotations

import csv
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from neuralreg.api import INPUT_KEYS, register_files
from neuralreg.config import RUN_KEYS, RegistrationConfig, RunConfig
from neuralreg.errors import InputError, OutputError
from neuralreg.files import file_record
from neuralreg.io.folders import describe, foreign_entries, read_manifest, try_lock

SUMMARY_FILES = ("summary.csv", "summary.png")

COLUMNS = ("pair_id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
SUMMARY_COLUMNS = (
    "pair_id",
    "status",
    "redone",
    "error",
    "seconds",
    "dice_before",
    "dice_after",
    "percent_folds_forward",
    "percent_folds_inverse",
    "inverse_consistency_error_mm",
    "final_loss",
    "quality",
    "quality_reasons",
)


class BatchInterrupted(KeyboardInterrupt):
    """Ctrl-C during ``register_pairs``: the summary of the finished pairs was written."""


@dataclass
class PairSpec:
    """One row of the pairs table (absolute paths, None where absent)."""

    pair_id: str
    fixed: str
    moving: str
    fixed_labels: str | None = None
    moving_labels: str | None = None
    fixed_mask: str | None = None
    moving_mask: str | None = None


def read_pairs(path) -> list[PairSpec]:
    """Parse a CSV or TSV pairs table; raises ``InputError`` with one line on bad tables."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"pairs table not found: {path}")
    text = path.read_text()
    delimiter = "\t" if path.suffix.lower() == ".tsv" or ("\t" in text.splitlines()[0] if text else False) else ","
    rows = list(csv.DictReader(text.splitlines(), delimiter=delimiter))
    if not rows:
        raise InputError(f"pairs table {path} has no rows")
    for i, row in enumerate(rows):
        if None in row:
            raise InputError(f"row {i + 1} of {path} has more fields than its header ({len(row) - 1} columns)")
    columns = set(rows[0].keys())
    missing = {"fixed", "moving"} - columns
    if missing:
        raise InputError(f"pairs table {path} lacks column(s) {', '.join(sorted(missing))}")
    unknown = columns - set(COLUMNS)
    if unknown:
        raise InputError(f"pairs table {path} has unknown column(s) {', '.join(sorted(unknown))}")
    specs, seen = [], set()
    for i, row in enumerate(rows):
        pair_id = (row.get("pair_id") or "").strip() or f"pair{i:04d}"
        if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", pair_id) or pair_id in SUMMARY_FILES:
            raise InputError(
                f"pair_id {pair_id!r} (row {i + 1}) must start with a letter or digit and use letters, digits, "
                f"'.', '_' or '-'" + (" (the name of the summary)" if pair_id in SUMMARY_FILES else "")
            )
        if pair_id in seen:
            raise InputError(f"pair_id {pair_id!r} appears twice")
        seen.add(pair_id)
        fields = {}
        for key in COLUMNS[1:]:
            value = (row.get(key) or "").strip()
            if key in ("fixed", "moving") and not value:
                raise InputError(f"row {i + 1} of {path} has no {key} image")
            fields[key] = str((path.parent / value).resolve()) if value else None
        specs.append(PairSpec(pair_id=pair_id, **fields))
    return specs


def register_one(
    spec: PairSpec,
    out_dir: str,
    config: dict,
    modality: str = "mri",
    threads: int = 1,
    ct_window=(40.0, 400.0),
    device: str = "cpu",
) -> dict:
    """Register one pair into ``out_dir/<pair_id>`` (runs on a worker). Never raises: failures are returned.

    Skips the pair when its folder is complete with the same inputs and options
    (``run_options``); registers it again, replacing the folder, when they changed.
    """
    import time

    out = Path(out_dir) / spec.pair_id
    t0 = time.perf_counter()
    try:
        options = run_options(config, modality, ct_window)
        inputs = {k: file_record(p) for k in INPUT_KEYS if (p := getattr(spec, k)) and Path(p).is_file()}
        previous = _previous_run(out)
        if previous is not None and previous == (inputs, options):
            return {**_summary_from_report(out), "pair_id": spec.pair_id, "status": "skipped"}
        redone = None
        if previous is not None:
            redone = "inputs changed" if previous[0] != inputs else "options changed"
        run = RunConfig(device=_worker_device(device), threads=max(1, threads), progress=False)
        _register_into(out, spec, RegistrationConfig.from_dict(config), run, modality, ct_window, options, inputs)
        return {
            **_summary_from_report(out),
            "pair_id": spec.pair_id,
            "status": "done",
            "redone": redone,
            "seconds": time.perf_counter() - t0,
        }
    except Exception as exc:  # recorded in the summary; the other pairs go on
        message = f"{type(exc).__name__}: {exc}".splitlines()[0] if not isinstance(exc, InputError) else str(exc)
        return {"pair_id": spec.pair_id, "status": "failed", "error": message, "seconds": time.perf_counter() - t0}


def _register_into(out: Path, spec: PairSpec, cfg, run, modality, ct_window, options: dict, inputs: dict) -> None:
    """``register_files`` of one pair into ``out``, the whole pair (reading and outputs too) on
    ``run.threads`` threads; the self-check's warning goes to the summary, not the log."""
    import warnings

    from neuralreg.errors import RegistrationWarning
    from neuralreg.optim.threads import run_threads

    with run_threads(run.threads), warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=RegistrationWarning)
        register_files(
            spec.fixed,
            spec.moving,
            out,
            cfg,
            run=run,
            **{k: getattr(spec, k) for k in INPUT_KEYS[2:]},
            modality=modality,
            ct_window=ct_window,
            overwrite=True,  # replaces only a folder neuralreg wrote (checked before the batch started)
            extra_report={"options": options},
            input_records=inputs,  # hashed by the caller to decide; every input exists once read_pair passed
        )


def run_options(config: dict, modality: str, ct_window) -> dict:
    """What shapes a pair's result besides its inputs: the config, the modality and (for CT)
    the window; recorded in ``report.json`` and compared on resume."""
    options = RegistrationConfig.from_dict(config).to_dict()
    options["modality"] = modality
    if modality == "ct":
        options["ct_window"] = [float(v) for v in ct_window]
    import json

    return json.loads(json.dumps(options))  # tuples as lists: equal to what report.json reads back


def _previous_run(folder: Path) -> tuple[dict, dict] | None:
    """(inputs, options) of the complete run in ``folder``, or None (no such folder or run)."""
    report = _complete_report(folder)
    if report is None:
        return None
    options = report.get("options")
    if isinstance(options, dict):  # folders written before the run options left the config carry them
        options = {k: v for k, v in options.items() if k not in RUN_KEYS}
    return report.get("inputs"), options


def is_complete(folder: Path) -> bool:
    """A pair's folder is complete when neuralreg wrote it and its ``report.json`` is readable JSON."""
    return _complete_report(folder) is not None


def _complete_report(folder: Path) -> dict | None:
    """The ``report.json`` of a complete folder neuralreg wrote, or None."""
    import json

    manifest = read_manifest(folder)
    if manifest is None or not manifest.get("complete") or "report.json" not in manifest["files"]:
        return None
    try:
        report = json.loads((Path(folder) / "report.json").read_text())
    except (OSError, ValueError):
        return None
    return report if isinstance(report, dict) else None


def check_batch_folder(specs: list[PairSpec], out_dir: Path) -> None:
    """Refuse (``OutputError``, one line) an output folder whose pair folders or summary files
    exist without being neuralreg's: nothing of the user's is ever replaced."""
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputError(f"--out {out_dir} exists and is not a folder")
    foreign = []
    for spec in specs:
        p = out_dir / spec.pair_id
        if p.is_symlink() or (p.exists() and not p.is_dir()) or (p.is_dir() and foreign_entries(p)):
            foreign.append(spec.pair_id)
    manifest = read_manifest(out_dir) if out_dir.is_dir() else None
    ours = set(manifest["files"]) if manifest else set()
    foreign += [n for n in SUMMARY_FILES if (out_dir / n).exists() and n not in ours]
    if foreign:
        raise OutputError(
            f"--out {out_dir} holds {describe(foreign, quote=False)}, not written by neuralreg; nothing was touched: "
            "name another --out (or other pair_ids)"
        )


def _worker_device(device: str) -> str:
    """On a GPU worker, ``cuda`` means the GPU matching the worker's index."""
    import torch

    if device != "cuda" or not torch.cuda.is_available():
        return device
    try:
        from distributed import get_worker

        name = get_worker().name
        index = int(name) if str(name).isdigit() else 0
    except (ImportError, ValueError):
        index = 0
    return f"cuda:{index % torch.cuda.device_count()}"


def _summary_from_report(folder: Path) -> dict:
    import json

    try:
        report = json.loads((folder / "report.json").read_text())
    except (OSError, ValueError):
        return {"error": "report.json unreadable"}
    return {
        "seconds": (report.get("timings") or {}).get("registration_seconds"),
        "dice_before": (report.get("dice_before") or {}).get("mean"),
        "dice_after": (report.get("dice_after") or {}).get("mean"),
        "percent_folds_forward": report.get("percent_folds_forward"),
        "percent_folds_inverse": report.get("percent_folds_inverse"),
        "inverse_consistency_error_mm": report.get("inverse_consistency_error_mm"),
        "final_loss": (report.get("final_loss_terms") or {}).get("loss"),
        "quality": (report.get("quality") or {}).get("verdict"),
        "quality_reasons": "; ".join((report.get("quality") or {}).get("reasons") or []),
    }


def default_workers(device: str) -> tuple[int, int]:
    """(workers, torch threads per worker): one per GPU, else about one per two of the CPUs this
    process may use (``neuralreg.cpus.available_cpus``: affinity and cgroup quota), at least 1."""
    import torch

    from neuralreg.cpus import available_cpus

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.device_count(), 2
    cores = available_cpus()
    workers = max(1, min(cores, cores // 2 if cores >= 4 else cores))
    return workers, max(1, cores // workers)


def register_pairs(
    pairs,
    out_dir,
    config: RegistrationConfig | None = None,
    scheduler: str | None = None,
    device: str = "cpu",
    workers: int | None = None,
    threads_per_worker: int | None = None,
    modality: str = "mri",
    progress: bool = True,
    ct_window=(40.0, 400.0),
) -> list[dict]:
    """Register every pair of a table (path or list of ``PairSpec``) on Dask; returns the summary rows.

    Args:
        pairs: CSV/TSV path or list of ``PairSpec``.
        out_dir: output folder; ``<pair_id>/`` per pair, ``summary.csv``, ``summary.png``.
            It may hold other files (a data root, say): they are never touched, and pair
            folders or summary files that neuralreg did not write stop the batch before it
            starts (``check_batch_folder``).
        config: registration configuration (every pair, the same seed).
        device: where the pairs run (``RunConfig.device``; one pair per GPU).
        scheduler: address of an existing Dask scheduler (default: an embedded LocalCluster).
        workers, threads_per_worker: LocalCluster size and torch threads per registration
            (defaults from ``default_workers``).
        modality, ct_window: intensity preprocessing (see ``neuralreg.io.preprocess``).
        progress: tqdm bar over pairs.

    Raises:
        OutputError: ``out_dir`` holds files in the way, or another batch is writing it.
        BatchInterrupted: Ctrl-C; the summary of the pairs finished was written.
    """
    specs = read_pairs(pairs) if not isinstance(pairs, list) else pairs
    cfg = config or RegistrationConfig()
    out_dir = Path(out_dir)
    check_batch_folder(specs, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    lock = try_lock(out_dir.resolve())
    if lock is None:
        raise OutputError(f"another neuralreg batch is writing {out_dir}; wait for it or name another --out")
    try:
        check_batch_folder(specs, out_dir)  # again, under the lock
        results, interrupted = _run(specs, out_dir, cfg, device, scheduler, workers, threads_per_worker, modality,
                                    progress, ct_window)  # fmt: skip
        if interrupted:  # a pair can finish on disk before its result reaches this process: the folder decides
            results += _finished_unreported(results, specs, out_dir)
        results.sort(key=lambda r: r["pair_id"])
        with _sigint_deferred():
            write_summary(results, out_dir, figure=True)
    finally:
        lock.release()
    if interrupted:
        finished = sum(r["status"] != "failed" for r in results)
        raise BatchInterrupted(
            f"interrupted: {finished} of {len(specs)} pairs complete, summary in {out_dir / 'summary.csv'}; "
            "re-run the same command to finish the rest"
        )
    return results


def _finished_unreported(results: list[dict], specs: list[PairSpec], out_dir: Path) -> list[dict]:
    """Summary rows of the pairs complete on disk whose result this process did not receive."""
    reported = {r["pair_id"] for r in results}
    return [
        {**_summary_from_report(out_dir / spec.pair_id), "pair_id": spec.pair_id, "status": "done"}
        for spec in specs
        if spec.pair_id not in reported and is_complete(out_dir / spec.pair_id)
    ]


def _run(specs, out_dir, cfg, device, scheduler, workers, threads_per_worker, modality, progress, ct_window):
    """Submit every pair, collect the rows as they finish (rewriting ``summary.csv`` after
    each); (rows, whether Ctrl-C stopped it)."""
    from distributed import as_completed
    from tqdm.auto import tqdm

    n_workers, n_threads = default_workers(device)
    n_workers, n_threads = workers or n_workers, threads_per_worker or n_threads
    gpu = device.startswith("cuda")
    results, futures, interrupted = [], [], False
    client = cluster = None
    try:
        client, cluster = _client(scheduler, n_workers, gpu)
        futures = [
            client.submit(
                register_one,
                spec,
                str(out_dir),
                cfg.to_dict(),
                modality,
                n_threads,
                tuple(ct_window),
                device,
                pure=False,
                key=f"register-{spec.pair_id}",
                resources={"GPU": 1} if gpu else None,
            )
            for spec in specs
        ]
        with tqdm(total=len(futures), disable=not progress, desc="pairs", unit="pair") as bar:
            for future in as_completed(futures):
                results.append(future.result())
                write_summary(sorted(results, key=lambda r: r["pair_id"]), out_dir, figure=False)
                bar.update(1)
                bar.set_postfix(failed=sum(r["status"] == "failed" for r in results))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        with _sigint_deferred():
            _shutdown(client, cluster, futures if interrupted else [])
    return results, interrupted


def _client(scheduler: str | None, n_workers: int, gpu: bool):
    """A Dask client: of the scheduler at ``scheduler``, or of a new LocalCluster; (client, cluster or None)."""
    import signal

    from distributed import Client, LocalCluster

    if scheduler:
        return Client(scheduler), None
    # worker processes inherit an ignored SIGINT (it survives exec): Ctrl-C reaches
    # this process alone, which then stops them cleanly
    main_thread = _is_main_thread()
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN) if main_thread else None
    try:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=1,
            processes=True,
            resources={"GPU": 1} if gpu else None,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
    finally:
        if main_thread:
            signal.signal(signal.SIGINT, previous)
    try:
        return Client(cluster), cluster
    except BaseException:
        cluster.close()
        raise


class _sigint_deferred:
    """Holds a Ctrl-C back while the summary is written or the workers stopped (main thread only):
    a second Ctrl-C then cannot leave a run without its summary. It is raised on exit."""

    def __enter__(self):
        import signal

        self.caught, self.previous = False, None
        if _is_main_thread():
            self.previous = signal.signal(signal.SIGINT, self._catch)
        return self

    def _catch(self, signum, frame):
        self.caught = True

    def __exit__(self, *exc):
        import signal

        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
        if self.caught and exc[0] is None:
            raise KeyboardInterrupt


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _shutdown(client, cluster, futures) -> None:
    """Cancel what is left and close the client and cluster without log noise."""
    import contextlib

    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    if client is None:
        return
    with contextlib.suppress(Exception):
        if futures:
            client.cancel(futures, force=True)
    with contextlib.suppress(Exception):
        client.close(timeout=10)
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)


def write_summary(rows: list[dict], out_dir: Path, figure: bool = True) -> None:
    """``summary.csv`` (one row per pair) and, with ``figure``, ``summary.png`` (Dice and folds
    distributions); both are listed in ``out_dir``'s manifest as neuralreg's."""
    from neuralreg.io import atomic_write
    from neuralreg.io.folders import add_to_manifest

    add_to_manifest(out_dir, SUMMARY_FILES, kind="batch")  # listed first: a crash leaves nothing unlisted
    with atomic_write(out_dir / "summary.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    if figure:
        _summary_figure(rows, out_dir)


def _summary_figure(rows: list[dict], out_dir: Path) -> None:
    from matplotlib.figure import Figure  # no pyplot: no backend switched, nothing global

    from neuralreg.io import atomic_write

    ok = [r for r in rows if r["status"] != "failed"]
    fig = Figure(figsize=(9, 3.5))
    ax = fig.subplots(1, 2)
    before = [r["dice_before"] for r in ok if r.get("dice_before") is not None]
    after = [r["dice_after"] for r in ok if r.get("dice_after") is not None]
    if after:
        ax[0].boxplot([before, after])
        ax[0].set_xticks([1, 2], ["before", "after"])
        ax[0].set_title(f"mean Dice ({len(after)} pairs)")
    else:
        ax[0].text(0.5, 0.5, "no label maps given", ha="center")
    folds = [r["percent_folds_forward"] for r in ok if r.get("percent_folds_forward") is not None]
    ax[1].hist(folds, bins=20)
    ax[1].set_title("% negative Jacobian (forward)")
    failed = len(rows) - len(ok)
    fig.suptitle(f"{len(rows)} pairs, {failed} failed")
    fig.tight_layout()
    with atomic_write(out_dir / "summary.png") as tmp:
        fig.savefig(tmp, dpi=80, format="png")
