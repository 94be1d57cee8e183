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
- Resumable: a pair whose output folder holds a readable ``report.json`` (written last,
  and folders appear atomically) is complete and skipped; a folder without one is
  recomputed; hidden ``.<pair_id>.tmp-*`` folders left by a killed run are removed. A
  pair that fails (bad file, divergence) is recorded with its error in the summary and
  does not stop the others.
- Interruptible: Ctrl-C stops the workers (they ignore the terminal's SIGINT, so they
  print nothing), writes the summary of the pairs that finished and raises
  ``BatchInterrupted``.
- Self-checked: each pair's quality verdict (``neuralreg.quality``) and its reasons are
  columns of the summary.
"""

from __future__ import annotations

import csv
import logging
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

from neuralreg.config import RegistrationConfig
from neuralreg.errors import InputError

COLUMNS = ("pair_id", "fixed", "moving", "fixed_labels", "moving_labels", "fixed_mask", "moving_mask")
SUMMARY_COLUMNS = (
    "pair_id",
    "status",
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
        if not re.fullmatch(r"[A-Za-z0-9._-]+", pair_id) or pair_id in (".", ".."):
            raise InputError(f"pair_id {pair_id!r} (row {i + 1}) must use letters, digits, '.', '_' or '-'")
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


def register_one(spec: PairSpec, out_dir: str, config: dict, modality: str = "mri", threads: int = 1) -> dict:
    """Register one pair into ``out_dir/<pair_id>`` (runs on a worker). Never raises: failures are returned."""
    import time

    import torch

    out = Path(out_dir) / spec.pair_id
    if is_complete(out):
        return {**_summary_from_report(out), "pair_id": spec.pair_id, "status": "skipped"}
    t0 = time.perf_counter()
    try:
        import warnings

        from neuralreg.errors import RegistrationWarning
        from neuralreg.io import preprocess, read_image, read_labels, read_mask
        from neuralreg.optim.pair import register_pair
        from neuralreg.report.outputs import write_outputs

        warnings.filterwarnings("ignore", category=RegistrationWarning)  # the verdict goes to the summary
        torch.set_num_threads(max(1, threads))
        cfg = RegistrationConfig.from_dict({**config, "progress": False, "threads": max(1, threads)})
        cfg.device = _worker_device(cfg.device)
        fixed = preprocess(read_image(spec.fixed, "fixed image"), modality)
        moving = preprocess(read_image(spec.moving, "moving image"), modality)
        labels = {
            k: read_labels(getattr(spec, k), k.replace("_", " ")) if getattr(spec, k) else None
            for k in ("fixed_labels", "moving_labels")
        }
        masks = {
            k: read_mask(getattr(spec, k), k.replace("_", " ")) if getattr(spec, k) else None
            for k in ("fixed_mask", "moving_mask")
        }
        reg = register_pair(moving, fixed, cfg, moving_mask=masks["moving_mask"], fixed_mask=masks["fixed_mask"])
        write_outputs(
            out,
            reg,
            moving,
            fixed,
            labels["moving_labels"],
            labels["fixed_labels"],
            extra_report={"inputs": asdict(spec)},
            overwrite=True,  # an incomplete folder (no readable report.json) is replaced
        )
        return {
            **_summary_from_report(out),
            "pair_id": spec.pair_id,
            "status": "done",
            "seconds": time.perf_counter() - t0,
        }
    except Exception as exc:  # recorded in the summary; the other pairs go on
        message = f"{type(exc).__name__}: {exc}".splitlines()[0] if not isinstance(exc, InputError) else str(exc)
        return {"pair_id": spec.pair_id, "status": "failed", "error": message, "seconds": time.perf_counter() - t0}


def is_complete(folder: Path) -> bool:
    """A pair's folder is complete when its ``report.json`` (written last) is readable JSON."""
    import json

    try:
        return isinstance(json.loads((Path(folder) / "report.json").read_text()), dict)
    except (OSError, ValueError):
        return False


def remove_stale_temporaries(out_dir: Path) -> list[str]:
    """Remove the hidden ``.<name>.tmp-*`` folders a killed run left in ``out_dir``; their names."""
    import shutil

    removed = []
    for p in Path(out_dir).glob(".*.tmp-*"):
        if p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p.name)
    return removed


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
    """(workers, torch threads per worker): one per GPU, else about one per two cores (at least 1)."""
    import torch

    if device.startswith("cuda") and torch.cuda.is_available():
        return torch.cuda.device_count(), 2
    cores = os.cpu_count() or 1
    workers = max(1, min(cores, cores // 2 if cores >= 4 else cores))
    return workers, max(1, cores // workers)


def register_pairs(
    pairs,
    out_dir,
    config: RegistrationConfig | None = None,
    scheduler: str | None = None,
    workers: int | None = None,
    threads_per_worker: int | None = None,
    modality: str = "mri",
    progress: bool = True,
) -> list[dict]:
    """Register every pair of a table (path or list of ``PairSpec``) on Dask; returns the summary rows.

    Args:
        pairs: CSV/TSV path or list of ``PairSpec``.
        out_dir: output folder; ``<pair_id>/`` per pair, ``summary.csv``, ``summary.png``.
        config: registration configuration (every pair, the same seed).
        scheduler: address of an existing Dask scheduler (default: an embedded LocalCluster).
        workers, threads_per_worker: LocalCluster size and torch threads per registration
            (defaults from ``default_workers``).
        modality: intensity preprocessing (see ``neuralreg.io.preprocess``).
        progress: tqdm bar over pairs.
    """
    import signal

    from distributed import Client, LocalCluster, as_completed
    from tqdm.auto import tqdm

    specs = read_pairs(pairs) if not isinstance(pairs, list) else pairs
    cfg = config or RegistrationConfig()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(out_dir)
    n_workers, n_threads = default_workers(cfg.device)
    n_workers, n_threads = workers or n_workers, threads_per_worker or n_threads
    gpu = cfg.device.startswith("cuda")
    cluster = None
    if scheduler:
        client = Client(scheduler)
    else:
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
        client = Client(cluster)
    results, futures, interrupted = [], [], False
    try:
        futures = [
            client.submit(
                register_one,
                spec,
                str(out_dir),
                cfg.to_dict(),
                modality,
                n_threads,
                pure=False,
                key=f"register-{spec.pair_id}",
                resources={"GPU": 1} if gpu else None,
            )
            for spec in specs
        ]
        with tqdm(total=len(futures), disable=not progress, desc="pairs", unit="pair") as bar:
            for future in as_completed(futures):
                row = future.result()
                results.append(row)
                bar.update(1)
                bar.set_postfix(failed=sum(r["status"] == "failed" for r in results))
    except KeyboardInterrupt:
        interrupted = True
    finally:
        _shutdown(client, cluster, futures if interrupted else [])
    if interrupted:  # a pair can finish on disk before its result reaches this process: the folder decides
        reported = {r["pair_id"] for r in results}
        results += [
            {**_summary_from_report(out_dir / spec.pair_id), "pair_id": spec.pair_id, "status": "done"}
            for spec in specs
            if spec.pair_id not in reported and is_complete(out_dir / spec.pair_id)
        ]
    results.sort(key=lambda r: r["pair_id"])
    write_summary(results, out_dir)
    if interrupted:
        finished = sum(r["status"] != "failed" for r in results)
        raise BatchInterrupted(
            f"interrupted: {finished} of {len(specs)} pairs complete, summary in {out_dir / 'summary.csv'}; "
            "re-run the same command to finish the rest"
        )
    return results


def _is_main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _shutdown(client, cluster, futures) -> None:
    """Cancel what is left and close the client and cluster without log noise."""
    import contextlib

    for name in ("distributed", "tornado", "asyncio"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    with contextlib.suppress(Exception):
        if futures:
            client.cancel(futures, force=True)
    with contextlib.suppress(Exception):
        client.close(timeout=10)
    if cluster is not None:
        with contextlib.suppress(Exception):
            cluster.close(timeout=10)


def write_summary(rows: list[dict], out_dir: Path) -> None:
    """``summary.csv`` (one row per pair) and ``summary.png`` (Dice and folds distributions)."""
    from neuralreg.io import atomic_write

    with atomic_write(out_dir / "summary.csv") as tmp:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for r in rows:
                writer.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in SUMMARY_COLUMNS})
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in rows if r["status"] != "failed"]
    fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
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
    plt.close(fig)
