"""Cohort throughput: pairs per minute with 1 and 2 Dask workers (one torch thread each).

python benchmarks/bench_batch.py [--pairs 6] [--steps 150]
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from pathlib import Path

from neuralreg import RegistrationConfig
from neuralreg.cli.batch import register_pairs
from neuralreg.io import write_image
from neuralreg.phantoms import knee_phantom_pair


def make_table(folder: Path, n: int) -> Path:
    rows = []
    for i in range(n):
        pair = knee_phantom_pair(i, shape=(24, 40, 40))
        for key in ("fixed", "moving"):
            write_image(pair[key], folder / f"{key}{i}.nii.gz")
        rows.append({"pair_id": f"p{i}", "fixed": f"fixed{i}.nii.gz", "moving": f"moving{i}.nii.gz"})
    with open(folder / "pairs.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    return folder / "pairs.csv"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=6, help="small 3D phantom pairs")
    parser.add_argument("--steps", type=int, default=150, help="steps per registration")
    args = parser.parse_args()
    cfg = RegistrationConfig(steps=args.steps, points=2048, regularizer_points=512)
    with tempfile.TemporaryDirectory() as tmp:
        table = make_table(Path(tmp), args.pairs)
        rates = {}
        for workers in (1, 2):
            t = time.perf_counter()
            rows = register_pairs(
                table, Path(tmp) / f"out{workers}", cfg, workers=workers, threads_per_worker=1, progress=False
            )
            minutes = (time.perf_counter() - t) / 60
            assert all(r["status"] == "done" for r in rows), rows
            rates[workers] = args.pairs / minutes
            print(f"  {workers} worker(s) x 1 thread: {rates[workers]:6.2f} pairs/min ({minutes * 60:.1f} s)")
        print(f"  speed-up 2 vs 1 workers: x{rates[2] / rates[1]:.2f}")


if __name__ == "__main__":
    main()
