"""Method comparison on prepared pairs: each (pair, method) runs in a fresh process and is scored alike.

A prepared pair is a folder with ``moving.nii.gz``, ``fixed.nii.gz``,
``moving_labels.nii.gz`` and ``fixed_labels.nii.gz`` (see ``examples/knee_benchmark.py``).
Running each registration in its own spawned process makes the peak memory (the child's
maximum resident set) and the CPU time (user + system of the child, all threads) that
method's alone (see ``run_method``).
"""

from __future__ import annotations

import json
import math
import multiprocessing as mp
import resource
import time
import traceback
from pathlib import Path

METHODS = ("neuralreg", "ants", "elastix")
# the pair scores of ``neuralreg.metrics.SCORES`` that a map read back from any method gives, and the knee's own
SCORE_KEYS = (
    "femoral",
    "tibial",
    "cartilage",
    "bone",
    "affine_bone",
    "percent_folds_forward",
    "inverse_consistency_error_mm",
    "field_correction_mm",
)


def _register(method: str, pair_dir: Path, config: dict, threads: int):
    from neuralreg.config import RegistrationConfig
    from neuralreg.geometry.transforms import AffineTransform
    from neuralreg.io import read_image, read_labels
    from neuralreg.metrics import field_correction
    from neuralreg_eval import baselines, knee

    moving, fixed = pair_dir / "moving.nii.gz", pair_dir / "fixed.nii.gz"
    if method == "neuralreg":
        import torch

        from neuralreg import register_pair

        torch.set_num_threads(threads)
        cfg = RegistrationConfig.from_dict({**config, "threads": threads, "progress": False})
        moving_img, fixed_img = read_image(moving), read_image(fixed)
        t0, c0 = time.perf_counter(), _cpu_seconds()
        reg = register_pair(moving_img, fixed_img, cfg)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        forward, inverse = knee.registration_maps(reg)
        affine_only = AffineTransform(reg.affine_world())
        quality = reg.info.get("quality", {}).get("verdict", "")
    elif method in baselines.RUNNERS:
        t0, c0 = time.perf_counter(), _cpu_seconds()
        res = baselines.RUNNERS[method](moving, fixed, threads=threads)
        seconds, cpu = time.perf_counter() - t0, _cpu_seconds() - c0
        forward, inverse, affine_only, quality = res.forward, res.inverse, res.affine, ""
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    moving_labels, fixed_labels = (read_labels(pair_dir / f"{k}_labels.nii.gz") for k in ("moving", "fixed"))
    scores = knee.score_maps(forward, inverse, moving_labels, fixed_labels)
    scores["affine_bone"] = (
        knee.score_maps(affine_only, None, moving_labels, fixed_labels)["bone"] if affine_only is not None else math.nan
    )
    scores["field_correction_mm"] = (
        field_correction(forward, affine_only, (fixed_labels.shape, fixed_labels.affine))
        if affine_only is not None
        else math.nan
    )
    scores["gross_failure"] = knee.gross_failure(scores["bone"], scores["affine_bone"])
    return {**scores, "seconds": seconds, "cpu_seconds": cpu, "quality": quality}


def _child(method, pair_dir, config, threads, queue):
    try:
        out = _register(method, Path(pair_dir), config, threads)
        out["peak_memory_mb"] = _peak_memory_mb()
        queue.put(("ok", out))
    except BaseException as exc:  # reported to the parent as one line
        queue.put(("error", f"{type(exc).__name__}: {exc}".splitlines()[0], traceback.format_exc()))


def _peak_memory_mb() -> float:
    """This process's peak resident memory: VmHWM (reset by exec, unlike ru_maxrss, which a
    spawned child inherits from its parent)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return float(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def run_method(method: str, pair_dir, config: dict | None = None, threads: int = 2, isolate: bool = True) -> dict:
    """Register one prepared pair with ``method`` and score it (``knee.score_maps`` keys).

    Adds ``seconds`` and ``cpu_seconds`` (wall and user + system time of the
    registration call alone, reading and scoring excluded) and ``peak_memory_mb`` (of the
    child process, everything included; NaN with ``isolate=False``). Raises RuntimeError if it failed.
    """
    config = config or {}
    if not isolate:
        out = _register(method, Path(pair_dir), config, threads)
        return {**out, "peak_memory_mb": math.nan}
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(method, str(pair_dir), config, threads, queue))
    proc.start()
    result = None
    while result is None:
        try:
            result = queue.get(timeout=1.0)
        except Exception:
            if not proc.is_alive():
                break
    proc.join()
    if result is None:
        raise RuntimeError(f"{method} crashed (exit code {proc.exitcode})")
    if result[0] == "error":
        raise RuntimeError(f"{method} failed: {result[1]}")
    return result[1]


def summarize(rows: list[dict], methods) -> list[dict]:
    """Mean and std per method over the pairs where it succeeded."""
    import numpy as np

    out = []
    for m in methods:
        ok = [r for r in rows if r["method"] == m and not r.get("error")]
        if not ok:
            continue
        s = {"method": m, "pairs": len(ok), "gross_failures": sum(_truthy(r.get("gross_failure")) for r in ok)}
        for k in (*SCORE_KEYS, "seconds", "cpu_seconds", "peak_memory_mb"):
            v = np.array([_number(r.get(k)) for r in ok], dtype=float)
            s[k] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
            s[k + "_std"] = float(np.nanstd(v)) if np.isfinite(v).any() else math.nan
        out.append(s)
    return out


def markdown_table(rows: list[dict], summary: list[dict]) -> str:
    """The per-pair table (worst initial bone overlap first) and the mean ± std table.

    ``affine bone`` is the bone Dice of the method's affine stage alone; a pair is a
    gross failure (``gross``) when its bone Dice after registration is below 0.85 or below
    its affine-only value (``knee.gross_failure``); ``verdict`` is neuralreg's own quality verdict.
    """
    lines = [
        "| pair | method | initial bone Dice | femoral | tibial | cartilage | bone | affine bone | gross "
        "| verdict | % neg. Jacobian | ICE mm | field corr. mm | s | CPU s | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (float(r.get("initial_bone", 0)), r["pair"], r["method"])):
        if r.get("error"):
            lines.append(f"| {r['pair']} | {r['method']} | {float(r['initial_bone']):.3f} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['pair']} | {r['method']} | {float(r['initial_bone']):.3f} | {float(r['femoral']):.3f} | "
            f"{float(r['tibial']):.3f} | {float(r['cartilage']):.3f} | {float(r['bone']):.3f} | "
            f"{_fmt(r.get('affine_bone', 'nan'), 3)} | {'**yes**' if _truthy(r.get('gross_failure')) else 'no'} | "
            f"{r.get('quality') or '-'} | "
            f"{float(r['percent_folds_forward']):.4f} | {_fmt(r['inverse_consistency_error_mm'], 2)} | "
            f"{_fmt(_number(r.get('field_correction_mm')), 1)} | {float(r['seconds']):.1f} | "
            f"{_fmt(r['cpu_seconds'], 1)} | {_fmt(r['peak_memory_mb'], 0)} |"
        )
    lines += [
        "",
        "| method | pairs | gross failures | femoral | tibial | cartilage | bone "
        "| % neg. Jacobian | ICE mm | s / pair | CPU s / pair | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [f"{s[k]:.3f} ± {s[k + '_std']:.3f}" for k in ("femoral", "tibial", "cartilage", "bone")]
        lines.append(
            f"| {s['method']} | {s['pairs']} | {s['gross_failures']} | {' | '.join(cells)} | "
            f"{s['percent_folds_forward']:.4f} | {_fmt(s['inverse_consistency_error_mm'], 2)} | {s['seconds']:.1f} | "
            f"{_fmt(s['cpu_seconds'], 1)} | "
            f"{_fmt(s['peak_memory_mb'], 0)} |"
        )
    return "\n".join(lines) + "\n"


def _number(v) -> float:
    """A table cell as a float; absent or empty (a column older rows lack) is NaN."""
    return math.nan if v is None or str(v).strip() == "" else float(v)


def _truthy(v) -> bool:
    return str(v).strip().lower() in ("1", "true", "yes")


def _fmt(v, digits: int) -> str:
    v = float(v)
    return "n/a" if math.isnan(v) else f"{v:.{digits}f}"


def save_json(obj, path) -> None:
    from neuralreg.files import atomic_write

    with atomic_write(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
