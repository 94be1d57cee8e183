"""Real knee MRI: the FAIR flexion pair, and the DESS knee under known smooth deformations.

1. FAIR knee (one subject, two flexion positions; $NEURALREG_DATA/fair_knee): NCC before,
   after the affine part alone, and after the full registration; % folds both ways.
2. DESS knee ($NEURALREG_DATA/dess_knee): warped by --deformations random smooth
   deformations of known displacement (amplitude --amplitude mm); the error of the
   recovered map against the truth, in mm, inside the knee (mean, median, 95th percentile).

    python examples/real_knees.py --out real_knees [--steps N] [--deformations 3]

Writes OUT/fair_knee/ and OUT/dess_<k>/ (the usual register outputs) and OUT/real_knees.json.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

try:
    import neuralreg_eval  # noqa: F401  (the knee protocol and the baselines live there)
except ImportError:
    sys.exit("error: this example needs the evaluation package: pip install -e ./eval (in a neuralreg checkout)")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, help="shared data folder (default: $NEURALREG_DATA)")
    p.add_argument("--out", type=Path, required=True, help="output folder")
    p.add_argument("--steps", type=int, help="optimization steps (default: the package default)")
    p.add_argument("--deformations", type=int, default=3, help="synthetic deformations of the DESS knee (default: 3)")
    p.add_argument("--amplitude", type=float, default=4.0, help="deformation amplitude in mm (default: 4)")
    p.add_argument("--dess-shape", type=int, nargs=3, default=(256, 256, 80), help="DESS grid (default: 256 256 80)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    return p.parse_args(argv)


def ncc(a, b) -> float:
    a, b = a.reshape(-1).double(), b.reshape(-1).double()
    a, b = a - a.mean(), b - b.mean()
    return float((a * b).sum() / (a.norm() * b.norm() + 1e-12))


def fair_knee(root: Path, out: Path, base_config, overwrite: bool) -> dict:
    import dataclasses

    import neuralreg
    from neuralreg.io import preprocess, read_image
    from neuralreg.report.outputs import write_outputs
    from neuralreg.result import Registration

    moving = preprocess(read_image(root / "fair_knee" / "knee_template.nii.gz"))
    fixed = preprocess(read_image(root / "fair_knee" / "knee_reference.nii.gz"))
    affine_only = neuralreg.register_pair(moving, fixed, dataclasses.replace(base_config, steps=1))
    reg = neuralreg.register_pair(moving, fixed, base_config)
    report = write_outputs(out / "fair_knee", reg, moving, fixed, overwrite=overwrite)
    return {
        "ncc_before": ncc(
            Registration.identity_warp(moving, fixed, mode="linear").data.reshape(-1), fixed.data.reshape(-1)
        ),
        "ncc_affine_only": ncc(affine_only.warp(moving).data.reshape(-1), fixed.data.reshape(-1)),
        "ncc_after": ncc(reg.warp(moving).data.reshape(-1), fixed.data.reshape(-1)),
        "percent_folds_forward": report["percent_folds_forward"],
        "percent_folds_inverse": report["percent_folds_inverse"],
        "inverse_consistency_error_mm": report["inverse_consistency_error_mm"],
        "seconds": reg.info["seconds"],
    }


def dess_knee(root: Path, out: Path, base_config, k: int, amplitude: float, shape, overwrite: bool) -> dict:
    """moving(y) = fixed(T(y)), T(y) = y + u(y) known: the true Phi_BA is T on the moving grid."""
    import numpy as np
    import torch
    from neuralreg_eval import knee

    import neuralreg
    from neuralreg import phantoms
    from neuralreg.geometry.coordinates import apply_affine, grid_points
    from neuralreg.io import preprocess, read_image
    from neuralreg.report.outputs import write_outputs

    files = sorted((root / "dess_knee").glob("*.nii*"))
    if not files:
        raise FileNotFoundError(f"no NIfTI image in {root / 'dess_knee'}")
    fixed = knee.resample_to_shape(preprocess(read_image(files[0])), shape)
    disp = phantoms.smooth_random_displacement(fixed.shape, fixed.affine, amplitude, 4, 100 + k)
    moving = phantoms.warp_by_displacement(fixed, disp)
    moving = moving.with_data(
        moving.data + 0.01 * torch.randn(moving.shape, generator=torch.Generator().manual_seed(k))
    )
    reg = neuralreg.register_pair(moving, fixed, base_config)
    write_outputs(out / f"dess_{k}", reg, moving, fixed, overwrite=overwrite)
    x = apply_affine(moving.affine, grid_points(moving.shape, dtype=torch.float64))
    truth = x + disp.reshape(-1, 3).double()
    found = reg.map_on_grid(direction="inverse").reshape(-1, 3).double()
    inside = (fixed.data.reshape(-1) > 0.1).numpy()  # the knee, not the air around it
    err = torch.linalg.norm(found - truth, dim=1).numpy()[inside]
    true_mag = torch.linalg.norm(disp.reshape(-1, 3).double(), dim=1).numpy()[inside]
    return {
        "true_displacement_mean_mm": float(true_mag.mean()),
        "error_mean_mm": float(err.mean()),
        "error_median_mm": float(np.median(err)),
        "error_p95_mm": float(np.percentile(err, 95)),
        "percent_folds": reg.percent_folds(),
        "seconds": reg.info["seconds"],
    }


def main(argv=None) -> int:
    args = parse_args(argv)
    root = args.data or (Path(os.environ["NEURALREG_DATA"]) if "NEURALREG_DATA" in os.environ else None)
    if root is None or not (root / "fair_knee").is_dir() or not (root / "dess_knee").is_dir():
        print(
            "error: the shared data folder (with fair_knee/ and dess_knee/) was not found: "
            "pass --data or set NEURALREG_DATA",
            file=sys.stderr,
        )
        return 2
    if args.out.exists() and not args.overwrite:
        print(f"error: output {args.out} exists; pass --overwrite to replace it", file=sys.stderr)
        return 2
    import neuralreg

    config = neuralreg.RegistrationConfig()
    if args.threads:  # this script's process, every registration in it
        import torch

        torch.set_num_threads(args.threads)
    if args.steps:
        config.steps = args.steps
    args.out.mkdir(parents=True, exist_ok=True)
    results = {"fair_knee": fair_knee(root, args.out, config, args.overwrite)}
    f = results["fair_knee"]
    print(
        f"FAIR knee: NCC {f['ncc_before']:.3f} -> affine {f['ncc_affine_only']:.3f} -> {f['ncc_after']:.3f}; "
        f"folds {f['percent_folds_forward']:.4f} % / {f['percent_folds_inverse']:.4f} %"
    )
    for k in range(args.deformations):
        r = dess_knee(root, args.out, config, k, args.amplitude, tuple(args.dess_shape), args.overwrite)
        results[f"dess_{k}"] = r
        print(
            f"DESS #{k}: true displacement {r['true_displacement_mean_mm']:.2f} mm, "
            f"error mean {r['error_mean_mm']:.2f} "
            f"/ median {r['error_median_mm']:.2f} / p95 {r['error_p95_mm']:.2f} mm, folds {r['percent_folds']:.4f} %"
        )
    (args.out / "real_knees.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
