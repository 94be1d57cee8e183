"""Baselines behind one interface: ANTs SyN (``antspyx``), elastix B-spline (``itk-elastix``)
and FireANTs greedy (``fireants``, plain PyTorch, run on the CPU here).

Each runs on two NIfTI files and returns its maps as ``DisplacementField`` s in world RAS
mm (forward on the fixed grid, inverse on the moving grid when the method has one), so
one scoring (``neuralreg_eval.knee.score_maps``) serves every method. All are optional:
``pip install -e "./eval[baselines]"`` (from a checkout) for ANTs and elastix, ``pip install
fireants`` for FireANTs (its licence restricts redistribution: we depend on it, never vendor it).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

from neuralreg.io import DisplacementField, read_displacement_field

BASELINES = ("ants", "elastix", "fireants")
_MODULES = {"ants": "ants", "elastix": "itk", "fireants": "fireants"}


def available(name: str) -> bool:
    """Whether the package a baseline needs is installed."""
    if name not in _MODULES:
        raise ValueError(f"unknown baseline {name!r}; choose from {BASELINES}")
    if importlib.util.find_spec(_MODULES[name]) is None:
        return False
    if name == "elastix":
        import itk

        return hasattr(itk, "ElastixRegistrationMethod") or importlib.util.find_spec("itk_elastix") is not None
    return True


@dataclass
class BaselineResult:
    """Maps of one baseline run: ``forward`` (fixed grid), ``inverse`` (moving grid, or None)
    and ``affine``, the forward map of the affine stage alone (or None)."""

    forward: DisplacementField
    inverse: DisplacementField | None
    affine: DisplacementField | None = None


def _set_threads(threads: int | None) -> None:
    if threads:
        os.environ["ITK_GLOBAL_DEFAULT_NUMBER_OF_THREADS"] = str(threads)


def ants_syn(
    moving_path, fixed_path, threads: int | None = None, type_of_transform: str = "SyN", seed: int | None = 1
) -> BaselineResult:
    """ANTs registration (default ``SyN``: affine then SyN, antspyx's default settings, mutual information).

    ``seed`` fixes the random metric sampling of the affine stage (``--random-seed``), so a
    run is repeatable at a given thread count (None, or 0, which ANTs reads as unseeded:
    ANTs draws its own). The transforms are written to a temporary folder and composed
    into displacement fields with ``antsApplyTransforms``; nothing is left behind.
    """
    _set_threads(threads)
    import ants

    fixed = ants.image_read(str(fixed_path))
    moving = ants.image_read(str(moving_path))
    saved_seed = ants.config._random_seed  # antspyx's only seed hook besides set_ants_deterministic (1 thread)
    ants.config._random_seed = seed
    try:
        with tempfile.TemporaryDirectory() as tmp:
            reg = ants.registration(
                fixed=fixed, moving=moving, type_of_transform=type_of_transform, outprefix=str(Path(tmp) / "reg_")
            )
            fwd = ants.apply_transforms(fixed, moving, reg["fwdtransforms"], compose=str(Path(tmp) / "fwd_"))
            inv = ants.apply_transforms(
                moving,
                fixed,
                reg["invtransforms"],
                whichtoinvert=[True, False] if len(reg["invtransforms"]) == 2 else None,
                compose=str(Path(tmp) / "inv_"),
            )
            affine = ants.apply_transforms(fixed, moving, reg["fwdtransforms"][-1:], compose=str(Path(tmp) / "aff_"))
            return BaselineResult(
                read_displacement_field(fwd), read_displacement_field(inv), read_displacement_field(affine)
            )
    finally:
        ants.config._random_seed = saved_seed


def elastix_bspline(
    moving_path, fixed_path, threads: int | None = None, grid_spacing_mm: float = 8.0, iterations: int = 250
) -> BaselineResult:
    """elastix: affine then B-spline, elastix's default maps with advanced Mattes mutual information.

    The default B-spline map's bending-energy penalty is left out: with more than one
    thread it crashes itk-elastix 0.25 (segmentation fault) on 80x192x192 knees, and
    alone it multiplies the time several-fold. Forward map only (elastix fits one direction).
    """
    _set_threads(threads)
    import itk

    fixed = itk.imread(str(fixed_path), itk.F)
    moving = itk.imread(str(moving_path), itk.F)
    params = itk.ParameterObject.New()
    affine = params.GetDefaultParameterMap("affine", 4)
    bspline = params.GetDefaultParameterMap("bspline", 4, grid_spacing_mm)
    bspline["Metric"] = ["AdvancedMattesMutualInformation"]
    bspline["Registration"] = ["MultiResolutionRegistration"]
    for key in ("Metric0Weight", "Metric1Weight"):
        if key in bspline:
            del bspline[key]
    for m in (affine, bspline):
        m["MaximumNumberOfIterations"] = [str(iterations)]
    params.AddParameterMap(affine)
    params.AddParameterMap(bspline)
    _, transform = itk.elastix_registration_method(
        fixed, moving, parameter_object=params, log_to_console=False, number_of_threads=threads or 0
    )
    with tempfile.TemporaryDirectory() as tmp:
        # transformix writes deformationField.nii into its output directory (default: cwd)
        field = itk.transformix_deformation_field(moving, transform, output_directory=tmp)
        path = Path(tmp) / "field.nii.gz"
        _write_itk_vector_field(field, fixed, path)
        return BaselineResult(read_displacement_field(path), None)


def _write_itk_vector_field(field, reference, path) -> None:
    """An itk vector image written as an ITK displacement field NIfTI on ``reference``'s grid."""
    import itk

    field.SetOrigin(reference.GetOrigin())
    field.SetSpacing(reference.GetSpacing())
    field.SetDirection(reference.GetDirection())
    itk.imwrite(field, str(path))


def fireants_greedy(moving_path, fixed_path, threads: int | None = None) -> BaselineResult:
    """FireANTs as its authors register a pair (their ``scripts/pairwise`` recipe, CPU):
    moments (second order: centre of mass and principal axes) -> affine (scales 8/4/2/1,
    200/100/50/20 iterations, local CC with a 5-voxel kernel, Adam) -> greedy compositive
    deformable (scales 4/2/1, 200/100/25 iterations, CC 5, Adam lr 0.5, gradient smoothing
    1). Forward and inverse maps are written by FireANTs as ANTs displacement fields.
    """
    import torch

    if threads:
        torch.set_num_threads(threads)
    from fireants.io import BatchedImages, Image
    from fireants.registration.affine import AffineRegistration
    from fireants.registration.greedy import GreedyRegistration
    from fireants.registration.moments import MomentsRegistration

    fixed = BatchedImages([Image.load_file(str(fixed_path), device="cpu")])
    moving = BatchedImages([Image.load_file(str(moving_path), device="cpu")])
    moments = MomentsRegistration(1, fixed, moving, moments=2, cc_kernel_size=5)
    moments.optimize()
    affine = AffineRegistration(
        [8, 4, 2, 1],
        [200, 100, 50, 20],
        fixed,
        moving,
        init_rigid=moments.get_affine_init(),
        loss_type="cc",
        optimizer="Adam",
        optimizer_lr=3e-3,
        cc_kernel_size=5,
        progress_bar=False,
    )
    affine.optimize()
    greedy = GreedyRegistration(
        scales=[4, 2, 1],
        iterations=[200, 100, 25],
        fixed_images=fixed,
        moving_images=moving,
        cc_kernel_size=5,
        deformation_type="compositive",
        smooth_grad_sigma=1,
        optimizer="adam",
        optimizer_lr=0.5,
        init_affine=affine.get_affine_matrix().detach(),
        progress_bar=False,
    )
    greedy.optimize()
    with tempfile.TemporaryDirectory() as tmp:
        fwd, inv = str(Path(tmp) / "fwd.nii.gz"), str(Path(tmp) / "inv.nii.gz")
        greedy.save_as_ants_transforms(fwd)
        greedy.save_as_ants_transforms(inv, save_inverse=True)
        return BaselineResult(read_displacement_field(fwd), read_displacement_field(inv))


RUNNERS = {"ants": ants_syn, "elastix": elastix_bspline, "fireants": fireants_greedy}


def main(argv=None) -> int:
    """``python -m neuralreg_eval.baselines METHOD MOVING FIXED OUT [--threads N]``: one
    baseline's whole run, as the benchmark times it. Writes OUT/forward.nii.gz (and
    inverse.nii.gz, affine.nii.gz when the method has them) as ITK displacement fields and
    OUT/call.json (seconds and CPU seconds of the registration call)."""
    import argparse
    import json
    import time

    from neuralreg.io import write_displacement_field
    from neuralreg_eval.benchmark import cpu_seconds

    p = argparse.ArgumentParser(prog="python -m neuralreg_eval.baselines", description=main.__doc__)
    p.add_argument("method", choices=sorted(RUNNERS))
    p.add_argument("moving", type=Path)
    p.add_argument("fixed", type=Path)
    p.add_argument("out", type=Path)
    p.add_argument("--threads", type=int)
    args = p.parse_args(argv)

    t0, c0 = time.perf_counter(), cpu_seconds()
    res = RUNNERS[args.method](args.moving, args.fixed, threads=args.threads)
    seconds, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("forward", "inverse", "affine"):
        field = getattr(res, name)
        if field is not None:
            write_displacement_field(field.data, field.affine, args.out / f"{name}.nii.gz")
    (args.out / "call.json").write_text(json.dumps({"seconds": seconds, "cpu_seconds": cpu}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
