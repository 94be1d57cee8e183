"""Neural displacement field Phi(u) = u + MLP(enc(u)) in the pair's normalized coordinates."""

from __future__ import annotations

import functools
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
        """Displacement D(u) (N, d), normalized units.

        Where a graph is recorded, the MLP is one autograd node (``_MLP``, backward written
        out); without one (evaluation) the layers run as they are."""
        feats = self.encoding(u)
        w = self.mlp[0].weight
        h = feats.to(w.dtype)
        if not torch.is_grad_enabled():
            return self.mlp(h).to(u.dtype)
        return _MLP.apply(h, self.mlp, *self._mlp_parameters()).to(u.dtype)

    def _mlp_parameters(self) -> list[torch.Tensor]:
        """(W, b) of each linear layer, first to last."""
        return [t for layer in self.mlp if isinstance(layer, nn.Linear) for t in (layer.weight, layer.bias)]

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return u + self.displacement(u)

    def forward_with_jacobian(self, u: torch.Tensor, n_jacobian: int | None = None):
        """Phi(u) (N, d) and its spatial Jacobian at the first ``n_jacobian`` points
        (n_jacobian, d, d) (None: all; 0: None), by pushing the encoding's Jacobian forward
        through the MLP (one pass; differentiable once w.r.t. parameters and u).

        The MLP's part is one autograd node (``_PushForward``) with its backward written
        out: a few matrix products a layer instead of autograd's graph of broadcasts,
        transposes and copies (a step of the fields makes four of these calls)."""
        m = u.shape[0] if n_jacobian is None else n_jacobian
        if m == 0:
            return self(u), None
        if m < u.shape[0]:
            y, jac = self.forward_with_jacobian(u[:m])
            return torch.cat([y, self(u[m:])]), jac
        feats, jac = self.encoding.forward_with_jacobian(u)
        w = self.mlp[0].weight
        derivatives = _derivatives(self.mlp[1]) if len(self.mlp) > 1 else _relu
        params = self._mlp_parameters()
        h, t = _PushForward.apply(feats.to(w.dtype), jac.to(w.dtype), derivatives, *params)
        eye = torch.eye(self.n_dims, dtype=u.dtype, device=u.device)
        return u + h.to(u.dtype), eye + t.to(u.dtype)

    @torch.no_grad()
    def evaluate(self, u: torch.Tensor, chunk: int = EVAL_CHUNK) -> torch.Tensor:
        """Phi(u) in chunks of ``chunk`` points (bounded memory), no graph."""
        out = torch.empty_like(u)
        for start in range(0, u.shape[0], chunk):
            out[start : start + chunk] = self(u[start : start + chunk])
        return out


def _relu(z):
    h = torch.relu(z)
    return h, torch.sign(h), None  # h >= 0: its sign is 1 where z > 0, else 0


def _silu(z):
    sig = torch.sigmoid(z)
    first = sig * (1 + z * (1 - sig))
    return z * sig, first, sig * (1 - sig) * (2 + z * (1 - 2 * sig))


def _softplus(z, beta: float, threshold: float):
    sig = torch.sigmoid(beta * z)
    return torch.nn.functional.softplus(z, beta, threshold), sig, beta * sig * (1 - sig)


def _tanh(z):
    th = torch.tanh(z)
    first = 1 - th * th
    return th, first, -2 * th * first


def _derivatives(layer: nn.Module):
    """The activation ``layer`` as z -> (sigma(z), sigma'(z), sigma''(z) or None where it is zero)."""
    if isinstance(layer, nn.Softplus):
        return functools.partial(_softplus, beta=layer.beta, threshold=layer.threshold)
    table = {nn.ReLU: _relu, nn.SiLU: _silu, nn.Tanh: _tanh}
    if type(layer) not in table:
        raise TypeError(f"no derivatives for {type(layer).__name__}")
    return table[type(layer)]


class _MLP(torch.autograd.Function):
    """The MLP ``mlp`` (``nn.Sequential`` of linear layers and one kind of activation) at
    features h (N, F) -> y (N, m), its backward written out: per layer a product for the
    input's gradient, one for the weight's and a sum for the bias' instead of autograd's
    graph of transposes. The same value as ``mlp(h)``, op for op, the gradients to rounding
    (test). Arguments after ``mlp``: (W, b) of each layer, first to last. A graph of the
    gradient (second derivatives: GradICON by autograd) is autograd's, through the same
    layers applied to these parameters.
    """

    @staticmethod
    def forward(ctx, h, mlp, *params):
        activation = mlp[1] if len(mlp) > 1 else None
        derivatives = _derivatives(activation) if activation is not None else _relu
        relu = isinstance(activation, nn.ReLU)  # its slope is read off its output in the backward
        inputs, slopes = [], []
        for k in range(0, len(params) - 2, 2):
            inputs.append(h)
            z = torch.addmm(params[k + 1], h, params[k].t())
            if relu:
                h = torch.relu(z)
            else:  # the slope from the derivatives, the value from the layer itself (bit for bit)
                slopes.append(derivatives(z)[1])
                h = activation(z)
        y = torch.addmm(params[-1], h, params[-2].t())
        ctx.save_for_backward(h, *inputs, *slopes, *params)
        ctx.activation, ctx.hidden, ctx.relu = activation, len(inputs), relu
        return y

    @staticmethod
    def backward(ctx, gy):
        tensors = ctx.saved_tensors
        n, m = ctx.hidden, 0 if ctx.relu else ctx.hidden
        h, inputs, slopes, params = tensors[0], tensors[1 : 1 + n], tensors[1 + n : 1 + n + m], tensors[1 + n + m :]
        if torch.is_grad_enabled():  # a graph of the gradient (second derivatives): autograd's
            h0 = inputs[0] if n else h
            with torch.enable_grad():
                y = h0
                for k in range(0, len(params) - 2, 2):
                    y = ctx.activation(torch.addmm(params[k + 1], y, params[k].t()))
                y = torch.addmm(params[-1], y, params[-2].t())
                wanted = [t for t in (h0, *params) if t.requires_grad]
                got = iter(torch.autograd.grad(y, wanted, gy, create_graph=True))
                return (
                    (next(got) if h0.requires_grad else None),
                    None,
                    *(next(got) if t.requires_grad else None for t in params),
                )
        grads = [None] * len(params)
        grads[-2], grads[-1] = gy.t() @ h, gy.sum(0)
        g = gy @ params[-2]
        outputs = (*inputs[1:], h)  # each hidden layer's output
        for k in range(n - 1, -1, -1):
            # ReLU: autograd's own backward of it (the gradient where the output is positive)
            gz = torch.ops.aten.threshold_backward(g, outputs[k], 0) if ctx.relu else g * slopes[k]
            grads[2 * k], grads[2 * k + 1] = gz.t() @ inputs[k], gz.sum(0)
            g = gz @ params[2 * k]
        return g, None, *grads


class _PushForward(torch.autograd.Function):
    """An MLP and its Jacobian pushed forward: features h0 (N, F) and their spatial
    Jacobian J0 (N, F, d) -> the output y (N, m) and its Jacobian dy/du (N, m, d).

    Per hidden layer (W, b, sigma): z = h W^T + b, h' = sigma(z), and the Jacobian's rows
    t (N, d, width), one per input direction, t' = sigma'(z) * (t W^T); the last layer is
    linear. The backward runs the same layers in reverse with sigma'' for the Jacobian's
    dependence on z (zero for ReLU). Arguments after ``derivatives`` (``_derivatives``
    of the activation): (W, b) of each layer, first to last.
    """

    @staticmethod
    def forward(ctx, h, jac, derivatives, *params):
        n, d = h.shape[0], jac.shape[2]
        t = jac.transpose(1, 2).reshape(n * d, -1)  # (N d, F): each layer one GEMM over N d rows
        saved = []
        for k in range(0, len(params) - 2, 2):
            w, b = params[k], params[k + 1]
            z = torch.addmm(b, h, w.t())
            u = t @ w.t()
            h_next, first, second = derivatives(z)
            t_next = (u.view(n, d, -1) * first[:, None, :]).view(n * d, -1)
            saved += [h, t, u, first, second]
            h, t = h_next, t_next
        w, b = params[-2], params[-1]
        y = torch.addmm(b, h, w.t())
        t_out = (t @ w.t()).view(n, d, -1).transpose(1, 2)
        ctx.derivatives_saved = [s is not None for s in saved]
        ctx.save_for_backward(h, t, *[s for s in saved if s is not None], *params)
        ctx.n, ctx.d, ctx.layers = n, d, len(params) // 2
        ctx.set_materialize_grads(False)  # an output not used (the second map's value in GradICON): None
        return y, t_out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gjac):
        n, d, layers = ctx.n, ctx.d, ctx.layers
        tensors = list(ctx.saved_tensors)
        h, t = tensors[0], tensors[1]
        params = tensors[len(tensors) - 2 * layers :]
        rest = iter(tensors[2 : len(tensors) - 2 * layers])
        saved = [next(rest) if present else None for present in ctx.derivatives_saved]
        grads = [None] * (2 * layers)
        w = params[-2]
        if gjac is None:
            gjac = torch.zeros(n, w.shape[0], d, dtype=h.dtype, device=h.device)
        gt = gjac.transpose(1, 2).reshape(n * d, -1)  # (N d, m)
        # gy None: the value was not used (GradICON's outer map), only its Jacobian
        grads[-2] = gt.t() @ t if gy is None else torch.addmm(gy.t() @ h, gt.t(), t)
        grads[-1] = torch.zeros_like(params[-1]) if gy is None else gy.sum(0)
        gh, gt = (None if gy is None else gy @ w), gt @ w
        for k in range(layers - 2, -1, -1):
            h_prev, t_prev, u, first, second = saved[5 * k : 5 * k + 5]
            gu = (gt.view(n, d, -1) * first[:, None, :]).view(n * d, -1)
            gz = None if gh is None else gh * first
            if second is not None:  # the Jacobian's rows depend on z through sigma'
                curvature = (gt.view(n, d, -1) * u.view(n, d, -1)).sum(1) * second
                gz = curvature if gz is None else gz + curvature
            w = params[2 * k]
            if gz is None:
                grads[2 * k], grads[2 * k + 1] = gu.t() @ t_prev, torch.zeros_like(params[2 * k + 1])
            else:
                grads[2 * k] = torch.addmm(gz.t() @ h_prev, gu.t(), t_prev)
                grads[2 * k + 1] = gz.sum(0)
            gh, gt = (None if gz is None else gz @ w), gu @ w
        gjac0 = gt.view(n, d, -1).transpose(1, 2)
        return gh, gjac0, None, *grads


class _UndrawnLinear(nn.Linear):
    """``nn.Linear`` whose constructor draws nothing (``_linear`` draws its parameters).

    Not ``torch.nn.utils.skip_init``: it builds the layer on the meta device, whose first
    use imports sympy (0.3-0.5 s of every command's start)."""

    def reset_parameters(self) -> None:
        pass


def _linear(width_in: int, width_out: int, generator: torch.Generator | None) -> nn.Linear:
    """``nn.Linear(width_in, width_out)`` with its own initialization (Kaiming-uniform weights,
    a = sqrt(5); uniform bias within 1/sqrt(fan_in)) drawn from ``generator``: nothing is
    drawn from torch's global generator."""
    layer = _UndrawnLinear(width_in, width_out)
    nn.init.kaiming_uniform_(layer.weight, a=math.sqrt(5), generator=generator)
    bound = 1 / math.sqrt(width_in) if width_in > 0 else 0
    nn.init.uniform_(layer.bias, -bound, bound, generator=generator)
    return layer
