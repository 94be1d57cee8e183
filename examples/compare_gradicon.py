"""Compare neuralreg with the convolutional GradICON knee model of ``icon-registration``.

Runs the pairs prepared by ``examples/knee_benchmark.py`` (OUT/pairs/<id>/) through
``icon_registration.pretrained_models.OAI_knees_gradICON_model``, without and with its
instance optimization (50 Adam steps on the pair, as ``itk_wrapper.register_pair``
does), and scores its maps with the same evaluation as every other method
(``neuralreg_eval.knee.score_maps``); neuralreg rows come from the benchmark's results.csv.

    python examples/compare_gradicon.py --pairs-dir knee_results/pairs --weights knee_model_weights.trch

The pretrained weights (``knee_model_weights_step_2.trch`` of the ICON releases) are
read from --weights; without it they are downloaded once into
~/.cache/neuralreg/. If they cannot be had the script says so and exits 2. Install the
model with ``pip install --no-deps icon_registration==1.1.9`` (it pins torchvision,
which would replace torch; neither this script nor the model imports torchvision).
--untrained runs a randomly initialized model (plumbing checks only, scores meaningless).
"""

from __future__ import annotations

import argparse
import copy
import csv
import sys
import time
from pathlib import Path

try:
    import neuralreg_eval  # noqa: F401  (the knee protocol and the baselines live there)
except ImportError:
    sys.exit("error: this example needs the evaluation package: pip install -e ./eval (in a neuralreg checkout)")

WEIGHTS_URL = (
    "https://github.com/uncbiag/ICON/releases/download/pretrained_models_v1.0.0/knee_model_weights_step_2.trch"
)
CACHE = Path.home() / ".cache" / "neuralreg" / "knee_model_weights.trch"


class ComparisonError(Exception):
    """One-line error for the user."""


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--pairs-dir", type=Path, required=True, help="OUT/pairs of knee_benchmark.py")
    p.add_argument("--out", type=Path, help="CSV of the scores (default: PAIRS_DIR/../gradicon_results.csv)")
    w = p.add_mutually_exclusive_group()
    w.add_argument("--weights", type=Path, help="local pretrained weights file (.trch)")
    w.add_argument("--untrained", action="store_true", help="random weights: test the plumbing only")
    p.add_argument("--finetune-steps", type=int, default=50, help="instance-optimization steps (default: 50)")
    p.add_argument("--learning-rate", type=float, default=2e-5, help="instance-optimization Adam rate (default: 2e-5)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default: cpu)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads (default: 2)")
    p.add_argument("--max-pairs", type=int, help="only the first N pairs")
    return p.parse_args(argv)


def load_model(weights: Path | None, untrained: bool, shape, device: str):
    """The GradICON knee network on ``shape`` (its identity map), weights loaded unless ``untrained``."""
    import torch

    try:
        from icon_registration.pretrained_models import OAI_knees_gradICON_model
    except ImportError as exc:
        raise ComparisonError(
            f"icon_registration is not installed ({exc}); pip install --no-deps icon_registration==1.1.9"
        ) from None
    net = OAI_knees_gradICON_model(pretrained=False)
    if not untrained:
        path = weights or _download_weights()
        if not Path(path).is_file():
            raise ComparisonError(f"weights file not found: {path}")
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=False)
            net.regis_net.load_state_dict(state, strict=False)
        except Exception as exc:
            raise ComparisonError(f"cannot load weights {path}: {type(exc).__name__}") from None
    net.assign_identity_map([1, 1, *shape])
    return net.to(device).eval()


def _download_weights() -> Path:
    if CACHE.is_file():
        return CACHE
    import urllib.request

    from neuralreg.io import atomic_write

    print(f"downloading the pretrained knee model to {CACHE}", file=sys.stderr)
    try:
        with atomic_write(CACHE) as tmp:
            urllib.request.urlretrieve(WEIGHTS_URL, tmp)
    except Exception as exc:
        raise ComparisonError(
            f"pretrained weights cannot be downloaded ({type(exc).__name__}); pass --weights PATH to a local copy"
        ) from None
    return CACHE


def run_model(net, moving, fixed, finetune_steps: int, learning_rate: float):
    """Phi_AB, Phi_BA of the network as voxel-index maps (1, 3, *shape) (A = moving, B = fixed)."""
    import torch

    shape = moving.shape
    a = moving.data.float()[None, None].to(net.identity_map.device)
    b = fixed.data.float()[None, None].to(net.identity_map.device)
    model = net
    if finetune_steps:
        model = copy.deepcopy(net).train()
        opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
        for _ in range(finetune_steps):
            opt.zero_grad()
            model(a, b)[0].backward()
            opt.step()
        model.eval()
    with torch.no_grad():
        model(a, b)
        scale = torch.tensor([n - 1 for n in shape], dtype=torch.float32, device=a.device).reshape(1, 3, 1, 1, 1)
        return model.phi_AB_vectorfield * scale, model.phi_BA_vectorfield * scale


def maps_as_fields(phi_ab_vox, phi_ba_vox, moving, fixed):
    """Voxel-index maps of the network as world ``DisplacementField`` s (fixed and moving grids)."""
    import torch

    from neuralreg.geometry.coordinates import apply_affine, grid_points
    from neuralreg.io import DisplacementField

    out = []
    for phi, src, dst in ((phi_ab_vox, moving, fixed), (phi_ba_vox, fixed, moving)):
        pts = phi[0].detach().cpu().permute(1, 2, 3, 0).reshape(-1, 3).double()
        world = apply_affine(src.affine, pts)
        ident = apply_affine(dst.affine, grid_points(dst.shape, dtype=torch.float64))
        out.append(DisplacementField((world - ident).float().reshape(*dst.shape, 3), dst.affine))
    return out


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import torch
        from neuralreg_eval import knee

        from neuralreg.io import read_image, read_labels

        torch.set_num_threads(args.threads)
        pair_dirs = sorted(p for p in args.pairs_dir.glob("*") if (p / "fixed.nii.gz").is_file())
        if not pair_dirs:
            raise ComparisonError(f"no prepared pairs in {args.pairs_dir} (run examples/knee_benchmark.py first)")
        pair_dirs = pair_dirs[: args.max_pairs] if args.max_pairs else pair_dirs
        first = read_image(pair_dirs[0] / "fixed.nii.gz")
        net = load_model(args.weights, args.untrained, first.shape, args.device)
        rows = []
        for pair_dir in pair_dirs:
            moving, fixed = read_image(pair_dir / "moving.nii.gz"), read_image(pair_dir / "fixed.nii.gz")
            if moving.shape != first.shape or fixed.shape != first.shape:
                raise ComparisonError(f"{pair_dir.name}: every pair must share one grid ({first.shape})")
            ml, fl = read_labels(pair_dir / "moving_labels.nii.gz"), read_labels(pair_dir / "fixed_labels.nii.gz")
            for name, steps in (("gradicon", 0), (f"gradicon+io{args.finetune_steps}", args.finetune_steps)):
                t0 = time.perf_counter()
                ab, ba = run_model(net, moving, fixed, steps, args.learning_rate)
                seconds = time.perf_counter() - t0
                fwd, inv = maps_as_fields(ab, ba, moving, fixed)
                rows.append(
                    {"pair": pair_dir.name, "method": name, **knee.score_maps(fwd, inv, ml, fl), "seconds": seconds}
                )
                r = rows[-1]
                print(
                    f"{r['pair']} {name}: cartilage {r['cartilage']:.3f} bone {r['bone']:.3f} "
                    f"folds {r['percent_folds_forward']:.4f} % ICE {r['inverse_consistency_error_mm']:.2f} mm "
                    f"{seconds:.1f} s"
                )
        out = args.out or args.pairs_dir.parent / "gradicon_results.csv"
        _write(out, rows)
        print(f"scores in {out}")
        return 0
    except ComparisonError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


def _write(path: Path, rows) -> None:
    from neuralreg.io import atomic_write

    with atomic_write(path) as tmp, open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)


if __name__ == "__main__":
    sys.exit(main())
