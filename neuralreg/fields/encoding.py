"""One hash-grid encoding interface with a backend switch (``torch``, ``native``, ``tcnn``, ``auto``).

Every backend uses the same parameter layout (tcnn's), so a table trained with one can
be evaluated with another. Inputs are clamped to [0, 1]^d before any backend sees them.
"""

from __future__ import annotations

import torch
from torch import nn

from neuralreg.config import HashGridConfig
from neuralreg.errors import InputError
from neuralreg.fields.hashgrid import level_layout
from neuralreg.fields.reference import TorchHashGridIndexer, hashgrid_encode_torch

BACKENDS = ("torch", "native", "tcnn")


def available_backends() -> dict[str, str]:
    """Which hash-grid backends can run here, with a one-line reason for each."""
    from neuralreg.fields import native
    from neuralreg.fields import tcnn as tcnn_backend

    return {
        "torch": "available (pure-PyTorch reference)",
        "native": native.status("cpu") + (f"; CUDA: {native.status('cuda')}" if torch.cuda.is_available() else ""),
        "tcnn": tcnn_backend.status(),
    }


def resolve_backend(backend: str, device: torch.device | str = "cpu") -> str:
    """Map ``auto`` to the fastest backend available on ``device``; check the others."""
    from neuralreg.fields import native
    from neuralreg.fields import tcnn as tcnn_backend

    device = torch.device(device)
    if backend == "auto":
        if device.type == "cuda" and tcnn_backend.is_available():
            return "tcnn"
        if native.hashgrid_available(device):
            return "native"
        return "torch"
    if backend == "native" and not native.hashgrid_available(device):
        kind = "cuda" if device.type == "cuda" else "cpu"
        raise InputError(f"native hash-grid backend requested but {native.status(kind)}; use backend auto or torch")
    if backend == "tcnn" and not (device.type == "cuda" and tcnn_backend.is_available()):
        raise InputError(f"tcnn backend requested but {tcnn_backend.status()} (needs CUDA); use backend auto or torch")
    return backend


class HashGridEncoding(nn.Module):
    """Multiresolution hash encoding of points in [0, 1]^d.

    Args:
        n_dims: input dimension d (2 or 3).
        config: the encoding configuration (tcnn keys).
        backend: ``torch``, ``native``, ``tcnn`` or ``auto``.

    ``forward(x)``: x (N, d) -> (N, L*F) features in the input's float dtype (float32 for tcnn).
    ``level_mask``: a (L,) buffer of 0/1 that switches levels off (coarse-to-fine).
    """

    def __init__(
        self,
        n_dims: int,
        config: HashGridConfig | None = None,
        backend: str = "torch",
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        if n_dims not in (2, 3):
            raise ValueError(f"hash-grid encoding supports 2 or 3 dimensions, not {n_dims}")
        self.config = config or HashGridConfig()
        self.n_dims = n_dims
        self.layout = level_layout(self.config, n_dims)
        self.n_output_dims = self.config.n_levels * self.config.n_features_per_level
        table = torch.empty(self.layout.n_params_rows, self.config.n_features_per_level)
        nn.init.uniform_(table, -1e-4, 1e-4, generator=generator)  # None: torch's global generator
        self.table = nn.Parameter(table)
        self.register_buffer("level_mask", torch.ones(self.config.n_levels))
        self.n_active = self.config.n_levels  # the mask's leading ones, kept on the host
        self.register_load_state_dict_post_hook(_recount_active_levels)
        self._indexer = None
        self.backend = backend
        self._tcnn = None

    def set_backend(self, backend: str) -> None:
        self.backend = resolve_backend(backend, self.table.device)

    def set_active_levels(self, n_active: int) -> None:
        """Enable the ``n_active`` coarsest levels; finer ones output zero and receive no gradient."""
        mask = torch.zeros_like(self.level_mask)
        self.n_active = max(1, min(n_active, self.config.n_levels))
        mask[: self.n_active] = 1
        self.level_mask.copy_(mask)

    def _native_levels(self, x: torch.Tensor):
        """Table rows and layout of the active levels (the native kernels skip the others)."""
        layout = self.layout.first(self.n_active)
        table = self.table if layout.n_params_rows == self.table.shape[0] else self.table[: layout.n_params_rows]
        return table.to(x.dtype), layout  # all levels: no slice, whose backward pads a copy of the gradient

    def _pad_levels(self, t: torch.Tensor) -> torch.Tensor:
        """(N, n_active*F, ...) -> (N, L*F, ...), zeros for the switched-off levels."""
        missing = self.n_output_dims - t.shape[1]
        if missing == 0:
            return t
        return torch.cat([t, t.new_zeros(t.shape[0], missing, *t.shape[2:])], 1)

    def indexer(self) -> TorchHashGridIndexer:
        dev = self.table.device
        if self._indexer is None or self._indexer.scales.device != dev:
            self._indexer = TorchHashGridIndexer(self.layout, self.n_dims, dev)
        return self._indexer

    def forward_with_jacobian(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Features (N, L*F) and their spatial Jacobian (N, L*F, d), differentiable once.

        The native backend computes both in one kernel; the others take the Jacobian by
        autograd (d backward passes) with the same result.
        """
        inside = ((x >= 0) & (x <= 1)).to(x.dtype)  # the clamp's derivative
        if self.backend == "native":
            from neuralreg.fields import native

            xc = x.clamp(0.0, 1.0)
            feats, jac = native.hashgrid_encode_with_jacobian(
                xc, *self._native_levels(x), self.config.interpolation == "Smoothstep"
            )
            # the kernel computed the active levels only and the switched-off ones are zero
            # padding: the level mask would multiply by exactly 1 and 0, so it is not applied
            return self._pad_levels(feats), self._pad_levels(jac) * inside[:, None, :]
        xg = x if x.requires_grad else x.detach().requires_grad_(True)
        feats = self(xg)
        rows = [
            torch.autograd.grad(feats[:, k].sum(), xg, create_graph=True, retain_graph=True)[0]
            for k in range(feats.shape[1])
        ]
        return feats, torch.stack(rows, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.clamp(0.0, 1.0)
        smooth = self.config.interpolation == "Smoothstep"
        if self.backend == "torch":
            out = hashgrid_encode_torch(x, self.table.to(x.dtype), self.indexer(), smooth)
        elif self.backend == "native":
            from neuralreg.fields import native

            # active levels only, zero padding after them: no mask to apply (see forward_with_jacobian)
            return self._pad_levels(native.hashgrid_encode(x, *self._native_levels(x), smooth))
        elif self.backend == "tcnn":
            from neuralreg.fields import tcnn as tcnn_backend

            out = tcnn_backend.encode(self, x)
        else:
            raise RuntimeError(f"backend {self.backend!r} not resolved; call set_backend")
        mask = self.level_mask.to(out.dtype).repeat_interleave(self.config.n_features_per_level)
        return out * mask


def _recount_active_levels(module: HashGridEncoding, incompatible_keys) -> None:
    """After ``load_state_dict``: the host's count of active levels from the loaded mask."""
    mask = module.level_mask.detach().cpu()
    module.n_active = max(1, int((mask > 0).long().cumprod(0).sum()))
