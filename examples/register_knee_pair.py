"""Register one OAI-style DESS knee pair with the OAI protocol.

Both images (and their cartilage label maps, if given: 1 femur, 2 femoral cartilage,
3 tibia, 4 tibial cartilage) are resampled to the half-resolution grid 80x192x192 over
their own extent; knees marked right are mirrored to left; the pair is registered and
the femoral and tibial cartilage Dice, % folds and the usual outputs are written.

    python examples/register_knee_pair.py FIXED.nii.gz MOVING.nii.gz --out OUT \\
        [--fixed-labels L.nii.gz --moving-labels L.nii.gz] [--flip-moving] [--flip-fixed]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from neuralreg_eval import knee  # the knee protocol and the baselines live there
except ImportError:
    sys.exit("error: this example needs the evaluation package: pip install -e ./eval (in a neuralreg checkout)")

import neuralreg
from neuralreg.errors import InputError
from neuralreg.io import check_same_grid, preprocess, read_image, read_labels
from neuralreg.io.folders import OutputFolder
from neuralreg.report.outputs import write_outputs


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("fixed", type=Path, help="fixed DESS image (NIfTI)")
    p.add_argument("moving", type=Path, help="moving DESS image (NIfTI)")
    p.add_argument("--out", type=Path, required=True, help="output folder (written whole or not at all)")
    p.add_argument("--fixed-labels", type=Path, help="fixed label map (scores Dice)")
    p.add_argument("--moving-labels", type=Path, help="moving label map")
    p.add_argument("--flip-moving", action="store_true", help="the moving knee is a right knee: mirror it")
    p.add_argument("--flip-fixed", action="store_true", help="the fixed knee is a right knee: mirror it")
    p.add_argument("--shape", type=int, nargs=3, default=(80, 192, 192), help="registration grid (default: 80 192 192)")
    p.add_argument("--steps", type=int, help="optimization steps (default: the package default)")
    p.add_argument("--threads", type=int, help="CPU threads (default: torch's choice)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--overwrite", action="store_true", help="replace an output folder neuralreg wrote")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    inputs = (args.fixed, args.moving, args.fixed_labels, args.moving_labels)
    try:
        with OutputFolder(args.out, args.overwrite, inputs) as folder:  # checked and held before registering
            report, reg, labels = _register(args, folder)
    except (InputError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if labels:
        c0, c = report["oai_cartilage_dice_before"], report["oai_cartilage_dice"]
        print(f"cartilage Dice femoral {c['femoral']:.3f}, tibial {c['tibial']:.3f}, mean {c['mean']:.3f}")
        print(f"(before: mean {c0['mean']:.3f})")
    print(
        f"folds {report['percent_folds_forward']:.4f} %, registered in {reg.info['seconds']:.1f} s; "
        f"outputs in {args.out}"
    )
    return 0


def _register(args, folder: OutputFolder):
    """Read, resample and register the pair, write the outputs into ``folder``; (report, registration, labels)."""
    if (args.fixed_labels is None) != (args.moving_labels is None):
        raise InputError("give both --fixed-labels and --moving-labels, or neither")
    images, labels = {}, {}
    for key, path, lab_path, flip in (
        ("fixed", args.fixed, args.fixed_labels, args.flip_fixed),
        ("moving", args.moving, args.moving_labels, args.flip_moving),
    ):
        img = read_image(path, f"{key} image")
        if img.n_dims != 3:
            raise InputError(f"{key} image {path} is {img.n_dims}D; knees are 3D")
        img = knee.resample_to_shape(preprocess(img, "mri"), args.shape)
        images[key] = knee.flip_left_right(img) if flip else img
        if lab_path is not None:
            lab = read_labels(lab_path, f"{key} labels")
            check_same_grid(lab, read_image(path), f"{key} labels {lab_path}", f"the {key} image {path}")
            lab = knee.resample_to_shape(lab, args.shape, labels=True)
            labels[key] = knee.flip_left_right(lab) if flip else lab
    steps = {"steps": args.steps} if args.steps else {}
    config = neuralreg.RegistrationConfig(**steps)
    run = neuralreg.RunConfig(device=args.device, threads=args.threads)
    reg = neuralreg.register_pair(images["moving"], images["fixed"], config, run=run)
    extra = {}
    if labels:
        warped = reg.warp(labels["moving"], mode="nearest")
        extra["oai_cartilage_dice_before"] = knee.cartilage_dice(labels["moving"].data, labels["fixed"].data)
        extra["oai_cartilage_dice"] = knee.cartilage_dice(warped.data, labels["fixed"].data)
    report = write_outputs(
        folder,
        reg,
        images["moving"],
        images["fixed"],
        labels.get("moving"),
        labels.get("fixed"),
        extra_report=extra,
    )
    return report, reg, labels


if __name__ == "__main__":
    sys.exit(main())
