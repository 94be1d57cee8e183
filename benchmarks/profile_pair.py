"""Where the seconds of one ``neuralreg register`` go: the whole command, phase by phase.

Runs the command a user runs (``neuralreg register --fixed F --moving M --out DIR``) in
this process with timers wrapped around the package's functions, and prints a table:
inclusive seconds (the phase with everything it calls), exclusive seconds (less the timed
phases inside it), calls and the share of the command's wall time. The start-up (Python,
``import neuralreg``, the native kernels' build check) is timed in a fresh process.

    python benchmarks/profile_pair.py --fixed F.nii.gz --moving M.nii.gz [--threads 2] [--json profile.json]
    python benchmarks/profile_pair.py --phantom          # a generated knee-like pair, offline

``backward`` is autograd's pass through everything of a step (encoding, MLP, Jacobian
push-forward, warp, LNCC); the forward parts are timed one by one.
"""

from __future__ import annotations

import argparse
import functools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from neuralreg import cli, io, losses, quality, result
from neuralreg.fields import encoding, field, native
from neuralreg.geometry import image
from neuralreg.optim import adam, alignment, registration, search, stage, watchdog
from neuralreg.report import outputs

# (module or class, attribute, label): the phases timed
PHASES = (
    (cli, "cmd_register", "neuralreg register (after start-up)"),
    (io, "read_image", "read images"),
    (registration, "choose_start", "global search + an affine fit per start"),
    (search, "global_search", "exhaustive rotation/FFT search"),
    (alignment.AffineFit, "run", "affine fits (every start)"),
    (stage.Stage, "__init__", "stage set-up (down-sampling, edge weights)"),
    (stage.Stage, "similarity", "similarity terms (forward)"),
    (stage.Stage, "regularizer", "GradICON term (forward)"),
    (encoding.HashGridEncoding, "forward", "hash-grid encoding"),
    (encoding.HashGridEncoding, "forward_with_jacobian", "hash-grid encoding with Jacobian"),
    (field.NeuralField, "displacement", "field: encoding + MLP"),
    (field.NeuralField, "forward_with_jacobian", "field with Jacobian: + MLP push-forward"),
    (native, "warp", "fused warp"),
    (native, "sample_values", "target values (warp without gradient)"),
    (image.Image, "sample", "image interpolation"),
    (losses.SIMILARITIES, "lncc", "local NCC"),
    (torch.autograd, "backward", "backward"),
    (adam.Adam, "step", "Adam step"),
    (watchdog.Snapshot, "__init__", "snapshots (watchdog)"),
    (quality, "assess", "self-check"),
    (outputs, "write_outputs", "write outputs"),
    (result.Registration, "displacement_on_grid", "displacement fields on grids"),
    (result.Registration, "jacobian_determinant", "Jacobian determinant"),
    (result.Registration, "warp", "warped images"),
    (result.Registration, "inverse_consistency_error", "inverse-consistency error"),
    (outputs, "write_image", "NIfTI writing (images)"),
    (outputs, "write_displacement_field", "NIfTI writing (fields)"),
    (outputs, "registration_figure", "figure"),
    (result.Registration, "save", "registration.pt"),
)


class Timers:
    """Inclusive and exclusive wall time per label, by a stack of the phases running."""

    def __init__(self):
        self.inclusive, self.exclusive, self.calls, self.stack = {}, {}, {}, []

    def wrap(self, fn, label):
        @functools.wraps(fn)
        def timed(*args, **kwargs):
            if self.stack and self.stack[-1][0] == label:  # recursion into the same phase: count once
                return fn(*args, **kwargs)
            self.stack.append([label, 0.0])
            t = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                dt = time.perf_counter() - t
                _, children = self.stack.pop()
                self.inclusive[label] = self.inclusive.get(label, 0.0) + dt
                self.exclusive[label] = self.exclusive.get(label, 0.0) + dt - children
                self.calls[label] = self.calls.get(label, 0) + 1
                if self.stack:
                    self.stack[-1][1] += dt

        return timed

    def install(self):
        for owner, name, label in PHASES:
            if isinstance(owner, dict):  # a registry (losses.SIMILARITIES): the optimizer looks it up there
                owner[name] = self.wrap(owner[name], label)
            else:
                setattr(owner, name, self.wrap(getattr(owner, name), label))


def start_up_seconds() -> float:
    """Wall time of a fresh ``python -c 'import neuralreg.cli; native kernels loaded'``."""
    code = "import neuralreg.cli, neuralreg.fields.native as n; n.hashgrid_available()"
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", code], check=True)
    return time.perf_counter() - t


def phantom_pair(folder: Path) -> tuple[Path, Path]:
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(seed=0, shape=(80, 192, 192), spacing=(1.4, 0.729, 0.729))
    paths = folder / "moving.nii.gz", folder / "fixed.nii.gz"
    io.write_image(pair["moving"], paths[0])
    io.write_image(pair["fixed"], paths[1])
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixed", type=Path)
    p.add_argument("--moving", type=Path)
    p.add_argument("--phantom", action="store_true", help="register a generated 80x192x192 knee phantom pair instead")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--json", type=Path, help="also write the table as JSON")
    p.add_argument("extra", nargs="*", help="more options for neuralreg register, after --")
    args = p.parse_args(argv)
    if not args.phantom and not (args.fixed and args.moving):
        p.error("give --fixed and --moving, or --phantom")
    start = start_up_seconds()
    timers = Timers()
    timers.install()
    with tempfile.TemporaryDirectory() as tmp:
        moving, fixed = phantom_pair(Path(tmp)) if args.phantom else (args.moving, args.fixed)
        argv = ["register", "--fixed", str(fixed), "--moving", str(moving), "--out", str(Path(tmp) / "out")]
        t = time.perf_counter()
        code = cli.main([*argv, "--threads", str(args.threads), "--quiet", *args.extra])
        wall = time.perf_counter() - t
    if code != 0:
        return code
    rows = [{"phase": "start-up: python, import neuralreg, native kernels", "inclusive_s": start, "calls": 1}]
    for _, _, label in PHASES:
        if label in timers.calls:
            rows.append(
                {
                    "phase": label,
                    "inclusive_s": timers.inclusive[label],
                    "exclusive_s": timers.exclusive[label],
                    "calls": timers.calls[label],
                }
            )
    total = start + wall
    print(f"whole command: {total:.1f} s wall (start-up {start:.1f} s + {wall:.1f} s), {args.threads} threads")
    print("| phase | inclusive s | exclusive s | calls | % of the command |\n|---|---|---|---|---|")
    for r in rows:
        incl, excl = r["inclusive_s"], r.get("exclusive_s", r["inclusive_s"])
        print(f"| {r['phase']} | {incl:.2f} | {excl:.2f} | {r['calls']} | {100 * incl / total:.1f} |")
    if args.json:
        args.json.write_text(json.dumps({"total_s": total, "start_up_s": start, "rows": rows}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
