"""``Registration``: the fitted pair of fields, evaluated on any grid in chunks."""

from __future__ import annotations

import math
import pickle
import warnings

import numpy as np
import torch

from neuralreg.config import RUN_KEYS, RegistrationConfig
from neuralreg.errors import RegistrationFileError
from neuralreg.fields.affine import AffineMap, ComposedMap, world_matrix
from neuralreg.fields.field import EVAL_CHUNK, NeuralField
from neuralreg.files import atomic_write
from neuralreg.geometry.coordinates import NormalizedBox, apply_affine, grid_points
from neuralreg.geometry.image import Image
from neuralreg.geometry.transforms import map_grid, resample, sample_world
from neuralreg.metrics import inverse_consistency_error, jacobian_determinant, percent_folds

FORMAT_VERSION = 1


class Registration:
    """Result of ``register_pair``.

    ``forward`` is Phi_AB: fixed-space world points -> moving-space world points (the map
    that pulls the moving image onto the fixed grid); ``inverse`` is Phi_BA.

    Attributes:
        phi_ab, phi_ba: the two ``NeuralField`` s (normalized coordinates).
        box: the ``NormalizedBox`` between world mm and the fields' unit cube.
        fixed_grid, moving_grid: (shape, affine) of the fixed and moving images.
        config: the ``RegistrationConfig`` used.
        history: per-step dict of loss terms (``part``: ``"affine"`` or ``"fields"``).
        info: timings and other facts of the run.
        affine: (d+1, d+1) global affine T on normalized coordinates (identity if None);
            Phi_AB = phi_ab o T and Phi_BA = phi_ba o T^-1 (see ``affine.py``).
        prealign: (d+1, d+1) rigid world map S (fixed -> moving mm) found by the global
            search (identity if None); the fields live in the frame of the moving image
            moved by S^-1, so in world mm Phi_AB(x) = S(box^-1(phi_ab(T(box(x))))) and
            Phi_BA(y) = box^-1(phi_ba(T^-1(box(S^-1 y)))).
    """

    def __init__(
        self,
        phi_ab,
        phi_ba,
        box,
        fixed_grid,
        moving_grid,
        config,
        history=None,
        info=None,
        affine=None,
        prealign=None,
    ):
        self.phi_ab, self.phi_ba = phi_ab.eval(), phi_ba.eval()
        d = phi_ab.n_dims
        self.affine = AffineMap(d).to(next(phi_ab.parameters()).device)
        if affine is not None:
            self.affine.set_matrix(affine)
        self.affine.requires_grad_(False)
        self._maps = {
            "forward": ComposedMap(self.phi_ab, self.affine, False),
            "inverse": ComposedMap(self.phi_ba, self.affine, True),
        }
        self.box = box
        self.prealign = np.eye(d + 1) if prealign is None else np.asarray(prealign, dtype=np.float64)
        self.fixed_grid = (
            tuple(fixed_grid[0]),
            np.asarray(fixed_grid[1], dtype=np.float64),
        )
        self.moving_grid = (
            tuple(moving_grid[0]),
            np.asarray(moving_grid[1], dtype=np.float64),
        )
        self.config = config
        self.history = history or []
        self.info = info or {}
        self._grid_cache: dict = {}

    @property
    def n_dims(self) -> int:
        return self.box.n_dims

    def _field(self, direction: str) -> ComposedMap:
        if direction not in ("forward", "inverse"):
            raise ValueError("direction must be 'forward' or 'inverse'")
        return self._maps[direction]

    def affine_world(self) -> np.ndarray:
        """The global affine part of Phi_AB, pre-alignment included: (d+1, d+1) world mm, fixed -> moving."""
        return self.prealign @ world_matrix(self.affine.matrix().double().cpu().numpy(), self.box)

    def _grid(self, direction: str):
        return self.fixed_grid if direction == "forward" else self.moving_grid

    @torch.no_grad()
    def map_points(
        self, points_world: torch.Tensor, direction: str = "forward", chunk: int = EVAL_CHUNK
    ) -> torch.Tensor:
        """Phi(x) for world points (N, d) in mm, evaluated in chunks."""
        field = self._field(direction)
        dev = next(field.parameters()).device
        pts = torch.as_tensor(points_world)
        if direction == "inverse":
            pts = apply_affine(np.linalg.inv(self.prealign), pts.double())
        pts = pts.float()
        out = torch.empty_like(pts)
        for s in range(0, pts.shape[0], chunk):
            u = self.box.to_normalized(pts[s : s + chunk].to(dev))
            out[s : s + chunk] = self.box.to_world(field(u)).cpu()
        if direction == "forward":
            out = apply_affine(self.prealign, out.double()).float()
        return out

    def transform(self, direction: str = "forward") -> _Direction:
        """One direction as a transform (``map_points``, world mm) for ``geometry.transforms``."""
        self._field(direction)
        return _Direction(self, direction)

    @torch.no_grad()
    def map_on_grid(self, shape=None, affine=None, direction: str = "forward", chunk: int = 65536) -> torch.Tensor:
        """World coordinates (*shape, d) of Phi at every voxel of a grid (default: the grid of its domain)."""
        if shape is None:
            shape, affine = self._grid(direction)
        key = (direction, tuple(shape), np.asarray(affine, dtype=np.float64).tobytes())
        if key in self._grid_cache:
            return self._grid_cache[key].clone()
        out = map_grid(self.transform(direction), shape, affine, chunk)
        if len(self._grid_cache) >= 4:
            self._grid_cache.pop(next(iter(self._grid_cache)))
        self._grid_cache[key] = out
        return out.clone()

    def displacement_on_grid(self, shape=None, affine=None, direction: str = "forward") -> torch.Tensor:
        """Phi(x) - x in world mm, (*shape, d)."""
        if shape is None:
            shape, affine = self._grid(direction)
        phi = self.map_on_grid(shape, affine, direction)
        ident = apply_affine(affine, grid_points(shape)).reshape(phi.shape)
        return phi - ident

    @torch.no_grad()
    def warp(self, image: Image, mode: str = "linear", direction: str = "forward", grid=None) -> Image:
        """Resample an image of the moving space onto the fixed grid (``forward``), or the reverse.

        Args:
            image: the image or label map to warp (any grid in its space).
            mode: ``"linear"`` for intensities, ``"nearest"`` for label maps.
            grid: (shape, affine) of the output; default the other image's grid.
        """
        shape, affine = grid if grid is not None else self._grid(direction)
        return Image(sample_world(image, self.map_on_grid(shape, affine, direction), mode), affine)

    @staticmethod
    def identity_warp(image: Image, target: Image, mode: str = "nearest") -> Image:
        """``image`` resampled onto ``target``'s grid by the identity map (world coordinates)."""
        return resample(image, None, (target.shape, target.affine), mode)

    def jacobian_determinant(self, direction: str = "forward") -> Image:
        """det of d(Phi)/dx on the domain grid (backward differences), as an Image."""
        shape, affine = self._grid(direction)
        return Image(
            jacobian_determinant(self.map_on_grid(shape, affine, direction), affine).float(),
            affine,
        )

    def percent_folds(self, direction: str = "forward") -> float:
        """% of domain-grid voxels with negative Jacobian determinant."""
        return percent_folds(self.jacobian_determinant(direction).data)

    @torch.no_grad()
    def inverse_consistency_error(
        self, direction: str = "inverse", max_points: int = 200000, mask: torch.Tensor | None = None
    ) -> float:
        """Mean ||Phi_AB(Phi_BA(x)) - x|| in mm over the moving grid (``inverse``: x in moving space).

        ``mask`` (the grid's shape) restricts the mean to its non-zero voxels.
        """
        other = "forward" if direction == "inverse" else "inverse"
        return inverse_consistency_error(
            self.transform(direction), self.transform(other), self._grid(direction), max_points, mask
        )

    def state(self) -> dict:
        return {
            "format_version": FORMAT_VERSION,
            "config": self.config.to_dict(),
            "box": self.box.state(),
            "fixed_grid": [list(self.fixed_grid[0]), self.fixed_grid[1].tolist()],
            "moving_grid": [list(self.moving_grid[0]), self.moving_grid[1].tolist()],
            "phi_ab": {k: v.cpu() for k, v in self.phi_ab.state_dict().items()},
            "phi_ba": {k: v.cpu() for k, v in self.phi_ba.state_dict().items()},
            "affine": self.affine.matrix().detach().cpu().double().numpy().tolist(),
            "prealign": self.prealign.tolist(),
            "history": self.history,
            "info": self.info,
        }

    def save(self, path) -> None:
        """Save the fitted fields (re-evaluate later at any resolution with ``Registration.load``)."""
        from pathlib import Path

        if Path(path).is_dir():
            raise RegistrationFileError(f"cannot save the registration to {path}: it is a folder, name a file")
        with atomic_write(path) as tmp:
            torch.save(self.state(), tmp)

    @classmethod
    def load(cls, path, device: str = "cpu") -> Registration:
        """Read a file written by ``save`` (0.1.0 files too).

        Only tensors and plain data are read (``torch.load(weights_only=True)``): opening a
        file from someone else cannot run code. Raises ``RegistrationFileError`` (one line)
        for a missing, corrupt or foreign file.
        """
        try:
            with warnings.catch_warnings():  # e.g. about the pickle protocol of a foreign file
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location=device, weights_only=True)
        except FileNotFoundError:
            raise RegistrationFileError(f"registration file not found: {path}") from None
        except pickle.UnpicklingError as exc:
            if "global" not in str(exc).lower():
                raise RegistrationFileError(f"{path} is not a readable neuralreg registration (corrupt)") from None
            raise RegistrationFileError(
                f"{path} holds Python objects other than tensors and plain data, which are not loaded "
                f"(it could run code): not a neuralreg registration ({str(exc).splitlines()[0][:120]})"
            ) from None
        except Exception as exc:
            raise RegistrationFileError(
                f"{path} is not a readable neuralreg registration ({type(exc).__name__})"
            ) from None
        if not isinstance(state, dict) or state.get("format_version") != FORMAT_VERSION:
            version = state.get("format_version") if isinstance(state, dict) else None
            raise RegistrationFileError(f"{path} is not a neuralreg registration (format {version})")
        try:
            # files written before the run options left the config carry them: they are not the algorithm's
            config = RegistrationConfig.from_dict({k: v for k, v in state["config"].items() if k not in RUN_KEYS})
            box = NormalizedBox.from_state(state["box"])
            fields = []
            for key in ("phi_ab", "phi_ba"):
                f = NeuralField(box.n_dims, config.field, torch.Generator())  # overwritten: no global draws
                f.load_state_dict(state[key])
                f.set_backend(config.field.backend)
                fields.append(f.to(device))
            _check_state(state, box.n_dims)
        except (KeyError, TypeError, ValueError, RuntimeError, IndexError) as exc:
            raise RegistrationFileError(
                f"{path} is a damaged neuralreg registration ({type(exc).__name__}: {str(exc).splitlines()[0][:120]})"
            ) from None
        return cls(
            fields[0],
            fields[1],
            box,
            state["fixed_grid"],
            state["moving_grid"],
            config,
            state["history"],
            state["info"],
            affine=state.get("affine"),
            prealign=state.get("prealign"),
        )


MAX_GRID_VOXELS = 1 << 31  # a grid in a registration file larger than this is damaged, not a real image


def _check_state(state: dict, d: int) -> None:
    """Raise ``ValueError`` for a state that would give wrong maps: non-finite parameters, a
    non-finite or singular affine, pre-alignment or box, or a grid that is no image's."""
    for key in ("phi_ab", "phi_ba"):
        for name, tensor in state[key].items():
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                raise ValueError(f"{key}.{name} has NaN or Inf values")
    box = state["box"]
    center, scale = np.asarray(box["center"], dtype=np.float64), float(box["scale"])
    if center.shape != (d,) or not np.isfinite(center).all() or not (np.isfinite(scale) and scale > 0):
        raise ValueError("the normalized box is not finite and positive")
    for key in ("affine", "prealign"):
        if state.get(key) is None:
            continue
        m = np.asarray(state[key], dtype=np.float64)
        if m.shape != (d + 1, d + 1) or not np.isfinite(m).all():
            raise ValueError(f"{key} is not a finite {d + 1}x{d + 1} matrix")
        if np.linalg.cond(m[:d, :d]) > 1e8:
            raise ValueError(f"{key} is singular")
    for key in ("fixed_grid", "moving_grid"):
        shape, affine = state[key]
        if len(shape) != d or not all(isinstance(n, int) and n >= 2 for n in shape):
            raise ValueError(f"{key} has shape {shape}, not {d} axes of at least 2 voxels")
        if math.prod(shape) > MAX_GRID_VOXELS:
            raise ValueError(f"{key} has {math.prod(shape)} voxels")
        Image(torch.zeros((2,) * d), affine)  # finite and non-singular, or ValueError


class _Direction:
    """``Registration.transform(direction)``: Phi_AB (``forward``) or Phi_BA as ``map_points``."""

    def __init__(self, reg: Registration, direction: str):
        self.reg, self.direction = reg, direction

    def map_points(self, points_world: torch.Tensor) -> torch.Tensor:
        return self.reg.map_points(points_world, self.direction)
