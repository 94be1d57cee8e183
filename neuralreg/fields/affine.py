"""The global affine part of a pair's maps, and its composition with the neural fields.

With an affine T (normalized coordinates, see ``neuralreg.geometry.coordinates``) the pair's maps are

    Phi_AB(u) = psi_AB(T(u))        (fixed -> moving)
    Phi_BA(u) = psi_BA(T^-1(u))     (moving -> fixed)

where psi(y) = y + D(y) are the ``NeuralField`` s. T and T^-1 are exact inverses, so the
affine part alone is inverse consistent; the fields model what remains.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from neuralreg.fields import fused
from neuralreg.fields.field import NeuralField


class AffineMap(nn.Module):
    """T(u) = c + (I + W)(u - c) + t, c = 0.5 (the box center): identity at init.

    Parameters ``weight`` W (d, d) and ``translation`` t (d,), normalized units.
    """

    def __init__(self, n_dims: int):
        super().__init__()
        self.n_dims = n_dims
        self.weight = nn.Parameter(torch.zeros(n_dims, n_dims))
        self.translation = nn.Parameter(torch.zeros(n_dims))
        self._matrices: dict = {}  # inverse -> (parameters' version key, matrix); ("rows", inverse) -> (matrix, rows)

    def linear(self) -> torch.Tensor:
        """I + W, (d, d)."""
        return torch.eye(self.n_dims, device=self.weight.device) + self.weight

    def matrix(self, inverse: bool = False) -> torch.Tensor:
        """(d+1, d+1) homogeneous matrix of T (or T^-1) on normalized coordinates.

        Where no graph is recorded (T frozen, as while the fields are fitted, or under
        ``no_grad``) the matrix is kept until the parameters change (an inverse per call of
        the maps was a tenth of a millisecond, six times a step)."""
        graph = torch.is_grad_enabled() and (self.weight.requires_grad or self.translation.requires_grad)
        if graph:
            return self._compute_matrix(inverse)
        key = (self.weight._version, self.translation._version, self.weight.data_ptr(), self.weight.device)
        cached = self._matrices.get(inverse)
        if cached is None or cached[0] != key:
            cached = (key, self._compute_matrix(inverse))
            self._matrices[inverse] = cached
        return cached[1]

    def _compute_matrix(self, inverse: bool) -> torch.Tensor:
        d = self.n_dims
        a = self.linear()
        c = torch.full((d,), 0.5, device=a.device)
        m = torch.eye(d + 1, device=a.device)
        m[:d, :d] = a
        m[:d, d] = c - a @ c + self.translation
        return torch.linalg.inv(m) if inverse else m

    def rows(self, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """T (or T^-1) as (A^T (d, d), b (d,)): points map as u A^T + b, one ``addmm``. Kept
        with the matrix where no graph is recorded."""
        graph = torch.is_grad_enabled() and (self.weight.requires_grad or self.translation.requires_grad)
        d = self.n_dims
        if graph:
            m = self._compute_matrix(inverse)
            return m[:d, :d].T, m[:d, d]
        m = self.matrix(inverse)
        key = ("rows", inverse)
        cached = self._matrices.get(key)
        if cached is None or cached[0] is not m:
            cached = (m, (m[:d, :d].T.contiguous(), m[:d, d].contiguous()))
            self._matrices[key] = cached
        return cached[1]

    def apply(self, u: torch.Tensor, inverse: bool = False) -> torch.Tensor:
        """T(u) or T^-1(u) for points u (N, d)."""
        linear_t, offset = self.rows(inverse)
        return torch.addmm(offset.to(u.dtype), u, linear_t.to(u.dtype))

    def set_matrix(self, matrix) -> None:
        """Set T from a (d+1, d+1) homogeneous matrix on normalized coordinates."""
        m = torch.as_tensor(np.asarray(matrix), dtype=torch.float32)
        d = self.n_dims
        a = m[:d, :d]
        c = torch.full((d,), 0.5)
        with torch.no_grad():
            self.weight.copy_(a - torch.eye(d))
            self.translation.copy_(m[:d, d] - c + a @ c)


class ComposedMap(nn.Module):
    """Phi(u) = field(T(u)) (``inverse=False``) or field(T^-1(u)): one direction of a pair.

    Offers the ``NeuralField`` interface used by the losses: ``forward`` (N, d) -> (N, d),
    ``forward_with_jacobian`` and ``encoding``; and ``forward_once``, the value where only
    first derivatives are taken (the similarity). Where ``fields.fused.applies`` (the native
    encoding, ReLU, T frozen) the latter two are one autograd node each (``fields.fused``).
    """

    def __init__(self, field: NeuralField, affine: AffineMap, inverse: bool):
        super().__init__()
        self.field = field
        self.affine = affine
        self.inverse = inverse

    @property
    def encoding(self):
        return self.field.encoding

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return self.field(self.affine.apply(u, self.inverse))

    def forward_once(self, u: torch.Tensor) -> torch.Tensor:
        """Phi(u) (N, d), differentiable once (w.r.t. the fields' parameters and u)."""
        if fused.applies(self, u):
            return fused.map_pass(self, u, 0)[0]
        return self(u)

    def forward_with_jacobian(self, u: torch.Tensor, n_jacobian: int | None = None):
        """Phi(u) (N, d) and its Jacobian (n_jacobian, d, d) at the first ``n_jacobian`` points
        (None: all; 0: None), J_field(T u) times the linear part of T. Differentiable once."""
        if fused.applies(self, u):
            return fused.map_pass(self, u, u.shape[0] if n_jacobian is None else n_jacobian)
        linear_t, offset = self.affine.rows(self.inverse)
        linear_t, offset = linear_t.to(u.dtype), offset.to(u.dtype)
        y, jac = self.field.forward_with_jacobian(torch.addmm(offset, u, linear_t), n_jacobian)
        if jac is None:
            return y, None
        m, d = jac.shape[0], self.affine.n_dims
        return y, torch.mm(jac.reshape(m * d, d), linear_t.T).view(m, d, d)


def world_matrix(affine_normalized: np.ndarray, box) -> np.ndarray:
    """The affine of normalized coordinates as a world (mm) matrix: x -> box^-1(T(box(x)))."""
    d = box.n_dims
    to_u = np.eye(d + 1)
    to_u[:d, :d] = np.eye(d) / box.scale
    to_u[:d, d] = -np.asarray(box.center) / box.scale + 0.5
    return np.linalg.inv(to_u) @ np.asarray(affine_normalized, dtype=np.float64) @ to_u


def intensity_centroid(image) -> np.ndarray:
    """World centroid (d,) of an image's intensity above its minimum (for translation init)."""
    return weighted_centroid(image, lambda small: small.data.float() - small.data.float().min())


def weighted_centroid(image, weights) -> np.ndarray:
    """World centroid (d,) of ``image``'s grid weighted by ``weights(small)`` (a tensor of
    ``small``'s shape, non-negative), ``small`` the image downsampled by 2 (as it is where a
    side is under 8 voxels); the grid's centre where the weights sum to 0."""
    from neuralreg.geometry.coordinates import apply_affine, grid_points

    small = image.downsample(2) if min(image.shape) >= 8 else image
    w = weights(small).reshape(-1).double()
    if float(w.sum()) <= 0:
        w = torch.ones_like(w)
    x = apply_affine(small.affine, grid_points(small.shape, dtype=torch.float64))
    return (w[:, None] * x).sum(0).numpy() / float(w.sum())
