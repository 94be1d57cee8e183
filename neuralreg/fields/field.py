"""Neural displacement field Phi(u) = u + MLP(enc(u)) in the pair's normalized coordinates."""

from __future__ import annotations

import math

import torch
from torch import nn

from neuralreg.config import FieldConfig
from neuralreg.fields.encoding import HashGridEncoding

EVAL_CHUNK = 16384  # points per piece when a field is evaluated without a graph: its activations
# (chunk x hidden width floats) stay in a CPU core's cache; 65536 took 1.4 s for a knee grid, this 0.9 s

_ACTIVATIONS = {
    "relu": lambda: nn.ReLU(inplace=True),  # on the linear layer's fresh output: one allocation less a call
    "silu": nn.SiLU,
    "softplus": lambda: nn.Softplus(beta=10.0),
    "tanh": nn.Tanh,
}


class NeuralField(nn.Module):
    """A map of [0, 1]^d (normalized world coordinates, see ``neuralreg.geometry.coordinates``) into itself.

    ``forward(u)``: u (N, d) -> Phi(u) (N, d). The last layer starts at zero, so a new
    field is the identity. Jacobians in normalized units equal Jacobians in mm because
    the normalization is isotropic.
    """

    def __init__(self, n_dims: int, config: FieldConfig | None = None, generator: torch.Generator | None = None):
        """``generator``: the random numbers of the initialization (the hash table, the hidden
        layers; None: torch's global generator). The draws are those of ``nn.Linear``'s own
        initialization, in the same order, so a generator seeded like the global one gives the
        same field."""
        super().__init__()
        self.config = config or FieldConfig()
        self.n_dims = n_dims
        self.encoding = HashGridEncoding(n_dims, self.config.encoding, backend="torch", generator=generator)
        layers: list[nn.Module] = []
        width_in = self.encoding.n_output_dims
        for _ in range(self.config.hidden_layers):
            layers += [
                _linear(width_in, self.config.hidden_width, generator),
                _ACTIVATIONS[self.config.activation](),
            ]
            width_in = self.config.hidden_width
        last = _linear(width_in, n_dims, generator)  # drawn, then zeroed: the field starts as the identity
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

    def forward_with_jacobian(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Phi(u) (N, d) and its spatial Jacobian (N, d, d), by pushing the encoding's
        Jacobian forward through the MLP (one pass; differentiable w.r.t. parameters and u)."""
        feats, jac = self.encoding.forward_with_jacobian(u)
        w = self.mlp[0].weight
        # t holds one row per input direction, (N, d, width): each layer is then one GEMM
        # over N*d rows instead of N broadcast matrix products
        h, t = feats.to(w.dtype), jac.to(w.dtype).transpose(1, 2).contiguous()
        for layer in self.mlp:
            if isinstance(layer, nn.Linear):
                h = layer(h)
                t = torch.matmul(t, layer.weight.T)
            else:
                t = t * _activation_derivative(layer, h)[:, None, :]
                h = layer(h)
        eye = torch.eye(self.n_dims, dtype=u.dtype, device=u.device)
        return u + h.to(u.dtype), eye + t.transpose(1, 2).to(u.dtype)

    @torch.no_grad()
    def evaluate(self, u: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
        """Phi(u) in chunks of ``chunk`` points (bounded memory), no graph."""
        out = torch.empty_like(u)
        for start in range(0, u.shape[0], chunk):
            out[start : start + chunk] = self(u[start : start + chunk])
        return out


def _activation_derivative(layer: nn.Module, pre: torch.Tensor) -> torch.Tensor:
    """d activation / d pre-activation, elementwise."""
    if isinstance(layer, nn.ReLU):
        return (pre > 0).to(pre.dtype)
    if isinstance(layer, nn.SiLU):
        sig = torch.sigmoid(pre)
        return sig * (1 + pre * (1 - sig))
    if isinstance(layer, nn.Softplus):
        return torch.sigmoid(layer.beta * pre)
    if isinstance(layer, nn.Tanh):
        return 1 - torch.tanh(pre) ** 2
    raise TypeError(f"no derivative for {type(layer).__name__}")


def _linear(width_in: int, width_out: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear(width_in, width_out)`` with its own initialization (Kaiming-uniform weights,
    a = sqrt(5); uniform bias within 1/sqrt(fan_in)) drawn from ``generator``."""
    layer = torch.nn.utils.skip_init(nn.Linear, width_in, width_out)
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(width_in) if width_in > 0 else 0
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer
