"""Register two NIfTI images from Python and save the results.

python examples/register_python_api.py FIXED.nii.gz MOVING.nii.gz OUT_DIR [--steps N]
"""

from __future__ import annotations

import argparse
import sys

import neuralreg
from neuralreg.errors import InputError
from neuralreg.io import preprocess, read_image
from neuralreg.report.outputs import write_outputs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("fixed")
    parser.add_argument("moving")
    parser.add_argument("out")
    parser.add_argument("--steps", type=int, default=300, help="optimization steps")
    args = parser.parse_args()
    try:
        fixed = preprocess(read_image(args.fixed, "fixed image"))
        moving = preprocess(read_image(args.moving, "moving image"))
        config = neuralreg.RegistrationConfig(steps=args.steps, points=8192)
        reg = neuralreg.register_pair(moving, fixed, config)
        report = write_outputs(args.out, reg, moving, fixed)
    except (InputError, FileExistsError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"folds {report['percent_folds_forward']:.4f} %, outputs in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
