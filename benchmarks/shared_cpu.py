"""A pair on a shared machine: the whole ``neuralreg register`` command alone, then beside a
busy process (one single-threaded Python loop), and the ratio of the two.

On a workstation or a cluster node the cores are rarely idle. Threads that spin while they
wait (OpenMP's default) collapse when another process holds one of their cores; the
command should slow down by about the share of the CPU it lost, not by multiples.

    python benchmarks/shared_cpu.py [--fixed F --moving M] [--threads 2] [--repeats 1] [--json out.json]

Without ``--fixed``/``--moving`` it registers the generated knee phantom pair (80x192x192).
Each environment in ``--env`` (``NAME=VALUE``, e.g. ``OMP_WAIT_POLICY=ACTIVE``) is run
alone and beside the busy process.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

BUSY = "import time\nt = time.time()\nwhile time.time() - t < 3600:\n    sum(i * i for i in range(10000))\n"


def run_command(fixed, moving, threads: int, env: dict, out: Path) -> float:
    """Wall seconds of one whole ``neuralreg register`` command."""
    cmd = [sys.executable, "-m", "neuralreg", "register", "--fixed", str(fixed), "--moving", str(moving)]
    cmd += ["--out", str(out), "--threads", str(threads), "--quiet"]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env={**os.environ, **env}, capture_output=True)
    return time.perf_counter() - t0


def measure(fixed, moving, threads: int, env: dict, repeats: int, work: Path) -> dict:
    alone, beside = [], []
    for r in range(repeats):
        alone.append(run_command(fixed, moving, threads, env, work / f"alone{r}"))
        busy = subprocess.Popen([sys.executable, "-c", BUSY])
        try:
            time.sleep(1.0)  # the busy process is running before the command starts
            beside.append(run_command(fixed, moving, threads, env, work / f"beside{r}"))
        finally:
            busy.kill()
            busy.wait()
    a, b = statistics.median(alone), statistics.median(beside)
    return {"env": env, "threads": threads, "alone_s": alone, "beside_s": beside, "ratio": b / a}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--fixed", type=Path)
    p.add_argument("--moving", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the command (repeatable: one run each)")
    p.add_argument("--json", type=Path)
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        fixed, moving = args.fixed, args.moving
        if fixed is None or moving is None:
            from neuralreg.io import write_image
            from neuralreg.phantoms import knee_phantom_pair

            pair = knee_phantom_pair(0, shape=(80, 192, 192))
            fixed, moving = work / "fixed.nii.gz", work / "moving.nii.gz"
            write_image(pair["fixed"], fixed)
            write_image(pair["moving"], moving)
        envs = [dict([e.split("=", 1)]) for e in args.env] or [{}]
        results = []
        for k, env in enumerate(envs):
            res = measure(fixed, moving, args.threads, env, args.repeats, work / f"env{k}")
            results.append(res)
            alone, beside = (", ".join(f"{v:.1f}" for v in res[key]) for key in ("alone_s", "beside_s"))
            print(f"{env or 'default'}: alone {alone} s, beside a busy process {beside} s: {res['ratio']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
