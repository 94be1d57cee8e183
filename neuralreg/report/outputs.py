"""The output folder of ``neuralreg register``, written whole or not at all.

Files (``<fixed grid>`` = the fixed image's grid and affine):
- ``warped.nii.gz``: the moving image, with its intensities as read, warped onto the fixed grid (linear);
- ``warped_labels.nii.gz``: moving labels warped (nearest), when given;
- ``displacement_forward.nii.gz``: Phi_AB - x on the fixed grid, ITK/ANTs convention
  (apply it to any moving-space image with antsApplyTransforms or SimpleITK);
- ``displacement_inverse.nii.gz``: Phi_BA - x on the moving grid, same convention;
- ``jacobian.nii.gz``: det of d(Phi_AB)/dx on the fixed grid;
- ``affine.tfm``: the global affine part of Phi_AB alone (ITK transform file, fixed ->
  moving); the displacement fields already include it;
- ``registration.pt``: both fitted fields (``neuralreg.Registration.load``), to
  re-evaluate at any resolution;
- ``report.json``: configuration, versions, timings, final loss terms, % folds, inverse
  consistency error, Dice when label maps are given, the global search's result, and
  ``quality``: the self-check's verdict (``good``, ``check`` or ``failed``), its reasons
  and measures (see ``neuralreg.quality``);
- ``figure.png``: mid slices of fixed, moving, warped, checkerboard, deformed grid, Jacobian;
- ``.neuralreg-manifest.json``: the list of the files above that neuralreg wrote (the
  folder is replaced, with ``--overwrite``, only while it holds nothing else).
"""

from __future__ import annotations

import json
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch

from neuralreg.files import json_safe
from neuralreg.geometry.image import Image
from neuralreg.io import write_displacement_field, write_image, write_itk_affine
from neuralreg.io.folders import OutputFolder
from neuralreg.metrics import dice, percent_folds
from neuralreg.quality import assess, judge
from neuralreg.report.figures import registration_figure
from neuralreg.result import Registration


def evaluate(
    reg: Registration, moving: Image, fixed: Image, moving_labels: Image | None, fixed_labels: Image | None
) -> dict:
    """Metrics of a fitted registration (forward map on the fixed grid)."""
    jac = reg.jacobian_determinant("forward")
    folds = percent_folds(jac.data)
    metrics = {
        "quality": _quality(reg, moving, fixed, folds).to_dict(),
        "percent_folds_forward": folds,
        "percent_folds_inverse": reg.percent_folds("inverse"),
        "inverse_consistency_error_mm": reg.inverse_consistency_error(),
        "jacobian_min": float(jac.data.min()),
        "jacobian_max": float(jac.data.max()),
    }
    warped_labels = None
    if moving_labels is not None:
        warped_labels = reg.warp(moving_labels, mode="nearest")
        if fixed_labels is not None:
            ident = Registration.identity_warp(moving_labels, fixed_labels)
            metrics["dice_before"] = dice(ident.data, fixed_labels.data)
            metrics["dice_after"] = dice(warped_labels.data, fixed_labels.data)
    return {"metrics": metrics, "jacobian": jac, "warped_labels": warped_labels}


def _quality(reg: Registration, moving: Image, fixed: Image, folds: float):
    """The self-check with the folds: ``register_pair``'s measures re-judged when they are of
    these images' grids, else measured anew (e.g. a ``Registration.load``-ed 0.1.0 file)."""
    done = reg.info.get("quality")
    same = (
        done is not None
        and tuple(fixed.shape) == reg.fixed_grid[0]
        and np.array_equal(fixed.affine, reg.fixed_grid[1])
        and tuple(moving.shape) == reg.moving_grid[0]
        and np.array_equal(moving.affine, reg.moving_grid[1])
    )
    if same:
        return judge({**done["measures"], "percent_folds": folds})
    return assess(reg, moving, fixed, percent_folds=folds)


def write_outputs(
    out,
    reg: Registration,
    moving: Image,
    fixed: Image,
    moving_labels: Image | None = None,
    fixed_labels: Image | None = None,
    extra_report: dict | None = None,
    overwrite: bool = False,
    extra_images: dict | None = None,
    original_moving: Image | None = None,
) -> dict:
    """Write every output file into the folder ``out``, whole or not at all; the report dictionary.

    ``out`` is a path or an ``OutputFolder`` the caller already holds (checked and locked
    before the registration, see ``neuralreg.io.folders``): only a folder neuralreg wrote
    is replaced, with ``overwrite``. ``moving`` and ``fixed`` are the images registered
    (preprocessed); ``original_moving``, when given, is the moving image as read, whose
    intensities ``warped.nii.gz`` keeps.
    """
    if not isinstance(out, OutputFolder):
        with OutputFolder(out, overwrite) as folder:
            return write_outputs(
                folder, reg, moving, fixed, moving_labels, fixed_labels, extra_report, overwrite, extra_images,
                original_moving,
            )  # fmt: skip
    report = {}

    def write(tmp: Path) -> None:
        report.update(_write_files(tmp, reg, moving, fixed, moving_labels, fixed_labels, extra_images, original_moving))
        report.update(extra_report or {})
        with open(tmp / "report.json", "w") as f:
            json.dump(json_safe(report), f, indent=2, default=str, allow_nan=False)  # json_safe made arrays lists

    out.commit(write)
    return report


def _write_files(tmp: Path, reg, moving, fixed, moving_labels, fixed_labels, extra_images, original_moving) -> dict:
    """Every output but ``report.json`` into ``tmp``; the report's entries."""
    t0 = time.perf_counter()
    # NIfTI files are gzip-compressed in background threads (zlib releases the GIL)
    # while the next arrays and the figure are computed; .result() re-raises errors
    with ThreadPoolExecutor(max_workers=2) as pool:
        writes = []
        ev = evaluate(reg, moving, fixed, moving_labels, fixed_labels)
        writes.append(pool.submit(write_image, ev["jacobian"], tmp / "jacobian.nii.gz", dtype=np.float32))
        warped = reg.warp(moving, mode="linear")
        kept = warped if original_moving is None else reg.warp(original_moving, mode="linear")
        writes.append(pool.submit(write_image, kept, tmp / "warped.nii.gz", dtype=np.float32))
        if ev["warped_labels"] is not None:
            writes.append(pool.submit(write_image, ev["warped_labels"], tmp / "warped_labels.nii.gz", dtype=np.int32))
        for direction, grid, name in (
            ("forward", fixed, "displacement_forward.nii.gz"),
            ("inverse", moving, "displacement_inverse.nii.gz"),
        ):
            disp = reg.displacement_on_grid(direction=direction)
            writes.append(pool.submit(write_displacement_field, disp, grid.affine, tmp / name))
        write_itk_affine(reg.affine_world(), tmp / "affine.tfm")
        reg.save(tmp / "registration.pt")
        for name, img in (extra_images or {}).items():
            writes.append(pool.submit(write_image, img, tmp / name))
        phi = reg.map_on_grid(direction="forward")
        registration_figure(tmp / "figure.png", fixed, moving, warped, phi, ev["jacobian"].data)
        for w in writes:
            w.result()
    return {
        "config": reg.config.to_dict(),
        "run": reg.info.get("run"),
        "versions": _versions(),
        "timings": {
            "registration_seconds": reg.info.get("seconds"),
            "registration_cpu_seconds": reg.info.get("cpu_seconds"),
            "output_seconds": time.perf_counter() - t0,
        },
        # the registration's thread count, and each change of it for other processes' load
        "threads": reg.info.get("threads"),
        "backend": reg.info.get("backend"),
        "recoveries": reg.info.get("recoveries"),
        "global_search": reg.info.get("search"),
        # what the first field stage fitted, and why (``PairRegistration._check_contrast``, ``_check_first_stage``)
        "contrast": reg.info.get("contrast"),
        "final_loss_terms": reg.info.get("final"),
        "affine_world_fixed_to_moving": reg.affine_world().tolist(),
        "fixed_grid": {"shape": list(fixed.shape), "affine": fixed.affine.tolist()},
        "moving_grid": {"shape": list(moving.shape), "affine": moving.affine.tolist()},
        **ev["metrics"],
    }


def _versions() -> dict:
    import nibabel

    from neuralreg.fields.encoding import available_backends
    from neuralreg.version import __version__

    return {
        "neuralreg": __version__,
        "torch": torch.__version__,
        "numpy": np.__version__,
        "nibabel": nibabel.__version__,
        "python": platform.python_version(),
        "backends": available_backends(),
    }
