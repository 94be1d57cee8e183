"""Method comparison on prepared pairs: each (pair, method) runs in a fresh process and is scored alike.

A prepared pair is a folder with ``moving.nii.gz``, ``fixed.nii.gz``,
``moving_labels.nii.gz`` and ``fixed_labels.nii.gz`` (see ``examples/knee_benchmark.py``).
Each method runs as the whole command a user starts (``neuralreg register``, or a
baseline's runner: Python start-up, imports, reading, registration, writing its maps) in
its own process, so that its wall time, CPU time (user + system, all threads) and peak
memory are that command's alone; its maps are then read back and scored alike (see ``run_method``).
"""

from __future__ import annotations

import json
import math
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = ("neuralreg", "ants", "elastix", "fireants")
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


# runs argv[2:], writes its CPU seconds and peak resident memory to argv[1], exits with its code
_USAGE_WRAPPER = """
import json, os, subprocess, sys
proc = subprocess.Popen(sys.argv[2:])
_, status, ru = os.wait4(proc.pid, 0)
usage = {"cpu_seconds": ru.ru_utime + ru.ru_stime, "peak_memory_mb": ru.ru_maxrss / 1024.0}
open(sys.argv[1], "w").write(json.dumps(usage))
sys.exit(os.waitstatus_to_exitcode(status))
"""

TIME_KEYS = ("seconds", "cpu_seconds", "command_seconds", "command_cpu_seconds", "peak_memory_mb")


def _maps(method: str, out: Path):
    """(forward, inverse, affine-only maps, neuralreg's verdict, call seconds, call CPU seconds)
    from a finished command's output folder."""
    from neuralreg.io import read_displacement_field

    if method == "neuralreg":
        from neuralreg.result import Registration

        timings = json.loads((out / "report.json").read_text())["timings"]
        call = (timings["registration_seconds"], timings.get("registration_cpu_seconds", math.nan))
        return *_neuralreg_maps(Registration.load(out / "registration.pt")), *call
    fields = {
        k: read_displacement_field(out / f"{k}.nii.gz") if (out / f"{k}.nii.gz").exists() else None
        for k in ("forward", "inverse", "affine")
    }
    call = json.loads((out / "call.json").read_text())
    return fields["forward"], fields["inverse"], fields["affine"], "", call["seconds"], call["cpu_seconds"]


def methods_and_config(methods_text: str, config_path=None, known=METHODS) -> tuple[list[str], dict]:
    """A benchmark script's ``--methods`` and ``--config``: (methods to run, RegistrationConfig
    keys). Raises ValueError (one line) for an unknown method or an unreadable config;
    baselines that are not installed are dropped with a note on stderr."""
    from neuralreg_eval import baselines

    methods = [m.strip() for m in methods_text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise ValueError(f"unknown method(s) {', '.join(unknown)}; choose from {', '.join(known)}")
    config = {}
    if config_path:
        try:
            config = json.loads(Path(config_path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"cannot read --config {config_path}: {exc}") from None
    for m in [m for m in methods if m in baselines.BASELINES and not baselines.available(m)]:
        how = "pip install fireants" if m == "fireants" else "pip install -e './eval[baselines]'"
        print(f"note: {m} is not installed ({how}); skipped", file=sys.stderr)
        methods.remove(m)
    return methods, config


def command(method: str, pair_dir: Path, out: Path, config: dict, threads: int) -> list[str]:
    """The whole run a user starts, as argv: ``neuralreg register`` (every output written),
    or a baseline's runner (``python -m neuralreg_eval.baselines``: read, register, write its maps)."""
    moving, fixed = str(pair_dir / "moving.nii.gz"), str(pair_dir / "fixed.nii.gz")
    if method == "neuralreg":
        argv = [sys.executable, "-m", "neuralreg", "register", "--fixed", fixed, "--moving", moving]
        argv += ["--out", str(out), "--threads", str(threads), "--quiet"]
        if config:
            path = out.parent / "config.json"
            path.write_text(json.dumps(config))
            argv += ["--config", str(path)]
        return argv
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    runner = [sys.executable, "-m", "neuralreg_eval.baselines", method]
    return [*runner, moving, fixed, str(out), "--threads", str(threads)]


def run_method(
    method: str,
    pair_dir,
    config: dict | None = None,
    threads: int = 2,
    isolate: bool = True,
    scorer=None,
    keep: Path | None = None,
) -> dict:
    """Register one prepared pair with ``method`` by its whole command, in its own process,
    and score it (``knee.score_maps`` keys).

    Adds ``command_seconds``, ``command_cpu_seconds`` and ``peak_memory_mb`` (wall, user +
    system time of all threads, and maximum resident memory of the command's process:
    Python start-up, imports, reading, registration and writing its outputs), and
    ``seconds``, ``cpu_seconds``: the registration call alone. ``isolate=False`` runs the
    call in this process instead, on the images as read (neuralreg through the Python API:
    no ``--modality`` normalization; no command figures, no peak memory). ``scorer(forward,
    inverse, affine_only, pair_dir) -> dict`` scores the maps (default: the knee protocol).
    ``keep``: where to copy neuralreg's ``registration.pt`` (its self-check can then be
    measured again offline). Raises RuntimeError if the method failed.
    """
    config = config or {}
    scorer = scorer or _score
    pair_dir = Path(pair_dir)
    if not isolate:
        return {**_register_here(method, pair_dir, config, threads, scorer), "peak_memory_mb": math.nan}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        log = Path(tmp) / "stderr.txt"
        argv = command(method, pair_dir, out, config, threads)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS": str(threads)}
        usage_file = Path(tmp) / "usage.json"
        with open(log, "wb") as err:
            t0 = time.perf_counter()
            # a small Python in between starts the command: a forked child's maximum
            # resident size starts at its parent's, and this process holds the scoring's arrays
            wrapper = [sys.executable, "-c", _USAGE_WRAPPER, str(usage_file), *argv]
            code = subprocess.run(wrapper, stdout=subprocess.DEVNULL, stderr=err, env=env).returncode
            wall = time.perf_counter() - t0
        if code != 0:
            lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
            raise RuntimeError(f"{method} failed (exit {code}): {lines[-1] if lines else 'no message'}")
        usage = json.loads(usage_file.read_text())
        forward, inverse, affine_only, quality, seconds, cpu = _maps(method, out)
        scores = scorer(forward, inverse, affine_only, pair_dir)
        measures = json.loads((out / "report.json").read_text())["quality"]["measures"] if method == "neuralreg" else {}
        if keep is not None and method == "neuralreg":
            Path(keep).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(out / "registration.pt", keep)
    return {
        **scores,
        "quality": quality,
        "quality_measures": json.dumps(measures) if measures else "",
        "seconds": seconds,
        "cpu_seconds": cpu,
        "command_seconds": wall,
        "command_cpu_seconds": usage["cpu_seconds"],
        "peak_memory_mb": usage["peak_memory_mb"],
    }


def _neuralreg_maps(reg):
    """(forward, inverse, affine-only maps, the self-check's verdict) of a ``Registration``."""
    from neuralreg.geometry.transforms import AffineTransform
    from neuralreg_eval import knee

    verdict = reg.info.get("quality", {}).get("verdict", "")
    return *knee.registration_maps(reg), AffineTransform(reg.affine_world()), verdict


def _register_here(method: str, pair_dir: Path, config: dict, threads: int, scorer) -> dict:
    """The registration call in this process (``run_method(isolate=False)``)."""
    from neuralreg.config import RegistrationConfig
    from neuralreg.io import read_image
    from neuralreg_eval import baselines

    moving, fixed = pair_dir / "moving.nii.gz", pair_dir / "fixed.nii.gz"
    if method == "neuralreg":
        import torch

        from neuralreg import register_pair

        torch.set_num_threads(threads)
        cfg = RegistrationConfig.from_dict(config)
        moving_img, fixed_img = read_image(moving), read_image(fixed)
        t0, c0 = time.perf_counter(), cpu_seconds()
        reg = register_pair(moving_img, fixed_img, cfg, run={"threads": threads, "progress": False})
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        forward, inverse, affine_only, quality = _neuralreg_maps(reg)
    elif method in baselines.RUNNERS:
        t0, c0 = time.perf_counter(), cpu_seconds()
        res = baselines.RUNNERS[method](moving, fixed, threads=threads)
        seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
        forward, inverse, affine_only, quality = res.forward, res.inverse, res.affine, ""
    else:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    scores = scorer(forward, inverse, affine_only, pair_dir)
    return {**scores, "quality": quality, "seconds": seconds, "cpu_seconds": cpu}


def _score(forward, inverse, affine_only, pair_dir: Path) -> dict:
    """``knee.score_maps`` of the maps, the affine stage's bone Dice, the field's correction
    beyond it, and the gross-failure flag."""
    from neuralreg.metrics import field_correction
    from neuralreg_eval import knee
    from neuralreg_eval.scoring import read_pair_labels

    moving_labels, fixed_labels = read_pair_labels(pair_dir)
    scores = knee.score_maps(forward, inverse, moving_labels, fixed_labels)
    affine = knee.score_maps(affine_only, None, moving_labels, fixed_labels) if affine_only is not None else {}
    scores["affine_bone"] = affine.get("bone", math.nan)
    scores["affine_bone_in_view"] = affine.get("bone_in_view", math.nan)
    scores["field_correction_mm"] = (
        field_correction(forward, affine_only, (fixed_labels.shape, fixed_labels.affine))
        if affine_only is not None
        else math.nan
    )
    scores["gross_failure"] = knee.gross_failure(scores["bone"], scores["affine_bone"], scores["cartilage"])
    # the same where the moving image has data: bone that its field of view cuts off cannot be placed
    scores["gross_failure_in_view"] = knee.gross_failure(
        scores["bone_in_view"], scores["affine_bone_in_view"], scores["cartilage_in_view"]
    )
    return scores


def cpu_seconds() -> float:
    """User + system CPU seconds of this process so far (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def summarize(rows: list[dict], methods) -> list[dict]:
    """Mean and std per method over the pairs where it succeeded."""
    import numpy as np

    out = []
    for m in methods:
        ok = [r for r in rows if r["method"] == m and not r.get("error")]
        if not ok:
            continue
        s = {
            "method": m,
            "pairs": len(ok),
            "gross_failures": sum(_truthy(r.get("gross_failure")) for r in ok),
            "gross_failures_in_view": sum(_truthy(r.get("gross_failure_in_view")) for r in ok),
        }
        for k in (*SCORE_KEYS, *TIME_KEYS):
            v = np.array([_number(r.get(k)) for r in ok], dtype=float)
            s[k] = float(np.nanmean(v)) if np.isfinite(v).any() else math.nan
            s[k + "_std"] = float(np.nanstd(v)) if np.isfinite(v).any() else math.nan
        out.append(s)
    return out


def _gross_cell(row: dict) -> str:
    """``**yes**`` / ``no``, and what the in-view scores say where they disagree."""
    whole, in_view = _truthy(row.get("gross_failure")), row.get("gross_failure_in_view")
    cell = "**yes**" if whole else "no"
    if in_view not in (None, "") and _truthy(in_view) != whole:
        cell += f" (in view: {'yes' if _truthy(in_view) else 'no'})"
    return cell


def markdown_table(rows: list[dict], summary: list[dict]) -> str:
    """The per-pair table (worst initial bone overlap first) and the mean ± std table.

    ``affine bone`` is the bone Dice of the method's affine stage alone; a pair is a
    gross failure (``gross``) when its bone Dice after registration is below 0.85 or below
    its affine-only value, or its cartilage Dice below 0.30 (``knee.gross_failure``); "in view"
    judges the same scores where the moving image has data (``knee.in_view``: a field of view
    that cuts the bones cuts what any method can place); ``verdict`` is neuralreg's own
    quality verdict.
    """
    lines = [
        "| pair | method | initial bone Dice | femoral | tibial | cartilage | bone | affine bone | gross "
        "| verdict | % neg. Jacobian | ICE mm | field corr. mm | command s | command CPU s | registration s "
        "| peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(rows, key=lambda r: (float(r.get("initial_bone", 0)), r["pair"], r["method"])):
        if r.get("error"):
            lines.append(f"| {r['pair']} | {r['method']} | {float(r['initial_bone']):.3f} | failed: {r['error']} |")
            continue
        lines.append(
            f"| {r['pair']} | {r['method']} | {float(r['initial_bone']):.3f} | {float(r['femoral']):.3f} | "
            f"{float(r['tibial']):.3f} | {float(r['cartilage']):.3f} | {float(r['bone']):.3f} | "
            f"{_fmt(r.get('affine_bone', 'nan'), 3)} | {_gross_cell(r)} | "
            f"{r.get('quality') or '-'} | "
            f"{float(r['percent_folds_forward']):.4f} | {_fmt(r['inverse_consistency_error_mm'], 2)} | "
            f"{_fmt(_number(r.get('field_correction_mm')), 1)} | {_fmt(_number(r.get('command_seconds')), 1)} | "
            f"{_fmt(_number(r.get('command_cpu_seconds')), 1)} | {float(r['seconds']):.1f} | "
            f"{_fmt(r['peak_memory_mb'], 0)} |"
        )
    lines += [
        "",
        "| method | pairs | gross failures | femoral | tibial | cartilage | bone "
        "| % neg. Jacobian | ICE mm | command s / pair | command CPU s / pair | registration s / pair | peak MB |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summary:
        cells = [f"{s[k]:.3f} ± {s[k + '_std']:.3f}" for k in ("femoral", "tibial", "cartilage", "bone")]
        gross = f"{s['gross_failures']} ({s['gross_failures_in_view']} in view)"
        lines.append(
            f"| {s['method']} | {s['pairs']} | {gross} | {' | '.join(cells)} | "
            f"{s['percent_folds_forward']:.4f} | {_fmt(s['inverse_consistency_error_mm'], 2)} | "
            f"{_fmt(s['command_seconds'], 1)} | {_fmt(s['command_cpu_seconds'], 1)} | {s['seconds']:.1f} | "
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
