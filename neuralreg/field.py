"""Neural displacement field Phi(u) = u + MLP(enc(u)) in the pair's normalized coordinates."""

from __future__ import annotations

import torch
from torch import nn

from .config import FieldConfig
from .encoding import HashGridEncoding

_ACTIVATIONS = {
    "relu": nn.ReLU,
    "silu": nn.SiLU,
    "softplus": lambda: nn.Softplus(beta=10.0),
    "tanh": nn.Tanh,
}


class NeuralField(nn.Module):
    """A map of [0, 1]^d (normalized world coordinates, see ``coordinates.py``) into itself.

    ``forward(u)``: u (N, d) -> Phi(u) (N, d). The last layer starts at zero, so a new
    field is the identity. Jacobians in normalized units equal Jacobians in mm because
    the normalization is isotropic.
    """

    def __init__(self, n_dims: int, config: FieldConfig | None = None):
        super().__init__()
        self.config = config or FieldConfig()
        self.n_dims = n_dims
        self.encoding = HashGridEncoding(n_dims, self.config.encoding, backend="torch")
        layers: list[nn.Module] = []
        width_in = self.encoding.n_output_dims
        for _ in range(self.config.hidden_layers):
            layers += [
                nn.Linear(width_in, self.config.hidden_width),
                _ACTIVATIONS[self.config.activation](),
            ]
            width_in = self.config.hidden_width
        last = nn.Linear(width_in, n_dims)
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        layers.append(last)
        self.mlp = nn.Sequential(*layers)

    def set_backend(self, backend: str) -> None:
        self.encoding.set_backend(backend)

    def displacement(self, u: torch.Tensor) -> torch.Tensor:
        """Displacement D(u) (N, d), normalized units."""
        feats = self.encoding(u)
        w = self.mlp[0].weight
        return self.mlp(feats.to(w.dtype)).to(u.dtype)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.displacement(u)

    @torch.no_grad()
    def evaluate(self, u: torch.Tensor, chunk: int = 65536) -> torch.Tensor:
        """Phi(u) in chunks of ``chunk`` points (bounded memory), no graph."""
        out = torch.empty_like(u)
        for start in range(0, u.shape[0], chunk):
            out[start : start + chunk] = self(u[start : start + chunk])
        return out
