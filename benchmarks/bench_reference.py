"""Baseline timings of the pure-PyTorch reference on this machine.

Prints ms per optimization step (forward, backward, GradICON step) at 16k and 64k points,
and the end-to-end time and Dice of the 2D triangles/circles and 3D phantom cases.

    python benchmarks/bench_reference.py [--threads N] [--skip-end-to-end]
"""

from __future__ import annotations

import argparse
import time

import torch
from timing import median_ms

from neuralreg import NeuralField, RegistrationConfig, register_pair
from neuralreg.config import FieldConfig
from neuralreg.losses import regularizers
from neuralreg.metrics import dice
from neuralreg.phantoms import knee_phantom_pair, triangles_pair


def step_timings(n_points: int, backend: str = "torch") -> dict:
    torch.manual_seed(0)
    cfg = FieldConfig(backend=backend)
    fa, fb = NeuralField(3, cfg), NeuralField(3, cfg)
    for f in (fa, fb):
        f.set_backend(backend)
        torch.nn.init.normal_(f.mlp[-1].weight, std=1e-2)
    x = torch.rand(n_points, 3)
    reg_points = torch.rand(n_points // 4, 3)

    def forward():
        with torch.no_grad():
            fa(x)

    def forward_backward():
        fa.zero_grad()
        fa(x).square().sum().backward()

    def gradicon_step():
        fa.zero_grad()
        fb.zero_grad()
        regularizers.gradicon(fa, fb, reg_points).backward()

    return {
        "forward": median_ms(forward),
        "forward+backward": median_ms(forward_backward),
        f"GradICON step ({n_points // 4} pts)": median_ms(gradicon_step, 3),
    }


def end_to_end() -> dict:
    out = {}
    pair = triangles_pair(0)
    cfg = RegistrationConfig(steps=800, points=4096, regularizer_points=1024, regularizer_weight=2.0)
    t = time.perf_counter()
    reg = register_pair(pair["moving"], pair["fixed"], cfg, run={"progress": False})
    out["2D triangles (800 steps)"] = {
        "seconds": time.perf_counter() - t,
        "dice_before": dice(pair["moving_labels"].data, pair["fixed_labels"].data)["mean"],
        "dice_after": dice(reg.warp(pair["moving_labels"], "nearest").data, pair["fixed_labels"].data)["mean"],
        "folds_%": reg.percent_folds(),
    }
    pair = knee_phantom_pair(0)
    cfg = RegistrationConfig(steps=250, points=4096, regularizer_points=1024)
    t = time.perf_counter()
    reg = register_pair(pair["moving"], pair["fixed"], cfg, run={"progress": False})
    lab = [2, 4]
    out["3D phantom 40x64x64 (250 steps)"] = {
        "seconds": time.perf_counter() - t,
        "cartilage_dice_before": dice(pair["moving_labels"].data, pair["fixed_labels"].data, lab)["mean"],
        "cartilage_dice_after": dice(reg.warp(pair["moving_labels"], "nearest").data, pair["fixed_labels"].data, lab)[
            "mean"
        ],
        "folds_%": reg.percent_folds(),
    }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--skip-end-to-end", action="store_true", help="only the per-step timings")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, default field config (3D)")
    for n in (16384, 65536):
        for name, ms in step_timings(n).items():
            print(f"  reference {name:>28s} @ {n:6d} points: {ms:9.1f} ms")
    if not args.skip_end_to_end:
        for case, res in end_to_end().items():
            print(f"  {case}: " + ", ".join(f"{k} {v:.3f}" for k, v in res.items()))


if __name__ == "__main__":
    main()
