"""Adam with the arithmetic of ``torch.optim.Adam``, without ``torch.optim``.

``torch.optim.Optimizer`` imports ``torch._dynamo`` on its first use (about 1 s, a thirtieth of a
knee registration's whole command on a 2-core machine). This is the same update, op for op
(betas (0.9, 0.999), eps 1e-8, no weight decay, no amsgrad), in one of torch's two
arithmetics, so a registration is bit for bit the one ``torch.optim.Adam`` gives
(``tests/optim/test_adam.py``):

- fused (the default for parameters of at least ``FUSED_MIN_ELEMENTS`` numbers where torch
  has the kernel: CUDA, and the CPU from torch 2.4): ``torch._fused_adam_``, the kernel
  behind ``torch.optim.Adam(fused=True)``: one pass over each parameter, its moments and its
  gradient. On the fields' hash tables (a million floats for two fields) it takes a third of
  the time of the eight passes below (0.45 against 1.35 ms a step on 2 cores), and on a GPU
  it is one launch instead of eight.
- unfused: ``torch.optim.Adam(foreach=False)``'s single-tensor arithmetic, one
  ``torch._foreach_*`` operation per line of it.
"""

from __future__ import annotations

import torch

FUSED_MIN_ELEMENTS = 1 << 16
"""Parameters of fewer numbers (the global affine part's 12) keep the single-tensor
arithmetic by default: the kernel saves nothing there, and the affine fits' ends are
sensitive to the last bits (with the fused kernel's rounding the two starts of an IXI pair
ended on other maps, losses -0.997 / -0.873 against -1.006 / -1.002, and the fields after
them had a 1.7 rather than 1.1 mm inverse-consistency error; docs/benchmarks.md)."""


def fused_available(device: torch.device | str) -> bool:
    """Whether this torch has ``torch._fused_adam_`` for tensors on ``device`` (CUDA; the CPU
    from torch 2.4)."""
    kind = torch.device(device).type
    if not hasattr(torch, "_fused_adam_"):
        return False
    if kind == "cpu":
        return torch.__version__ >= (2, 4)  # torch's TorchVersion compares with tuples
    return kind == "cuda"


class Adam:
    """Adam over a list of parameters, one learning rate for all.

    Attributes:
        lr: the learning rate of the next ``step`` (set it to schedule).
        betas, eps: Adam's constants (torch's defaults).
        fused: ``torch.optim.Adam(fused=True)``'s kernel (True) or its single-tensor
            arithmetic (False); None: fused where ``fused_available`` for the parameters'
            device and they hold at least ``FUSED_MIN_ELEMENTS`` numbers.
    """

    def __init__(
        self,
        params,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        fused: bool | None = None,
    ):
        self.params = list(params)
        self.lr = float(lr)
        self.betas = betas
        self.eps = eps
        if fused is None:
            fused = (
                bool(self.params)
                and sum(p.numel() for p in self.params) >= FUSED_MIN_ELEMENTS
                and fused_available(self.params[0].device)
            )
        elif fused and self.params and not fused_available(self.params[0].device):
            raise ValueError(f"this torch ({torch.__version__}) has no fused Adam on {self.params[0].device}")
        self.fused = fused
        # index in ``params`` -> step, exp_avg, exp_avg_sq. The step is a float on the host
        # (unfused: torch's is a CPU tensor read back by .item() every step, the same float
        # without a read) or, fused, a float32 tensor beside the parameter, as torch's is.
        self.state: dict[int, dict] = {}
        self._scratch: dict[int, torch.Tensor] = {}  # index -> the denominator's buffer (no state)

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none=True``: the backward pass allocates them anew)."""
        for p in self.params:
            p.grad = None

    def step(self) -> None:
        """One update of every parameter that has a gradient (the others keep their state and step count)."""
        step_together([self])

    def _state(self, i: int) -> dict:
        """Parameter ``i``'s step count and moments, new (zero) on its first update."""
        state = self.state.get(i)
        if state is None:
            param = self.params[i]
            step = torch.zeros((), dtype=torch.float32, device=param.device) if self.fused else 0.0
            state = self.state[i] = {
                "step": step,
                "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
            }
        return state

    def _denominator(self, i: int, param: torch.Tensor) -> torch.Tensor:
        """Parameter ``i``'s buffer for Adam's denominator (no state: rewritten every step)."""
        denom = self._scratch.get(i)
        if denom is None:
            denom = self._scratch[i] = torch.empty_like(param, memory_format=torch.preserve_format)
        return denom

    def state_dict(self) -> dict:
        """The learning rate and the moments (references: copy them to keep a snapshot)."""
        return {"lr": self.lr, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        """Take the learning rate and the moments of ``state_dict`` (copies of the tensors)."""
        self.lr = float(state["lr"])
        self.state = {
            i: {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in s.items()}
            for i, s in state["state"].items()
        }


@torch.no_grad()
def step_together(optimizers: list[Adam]) -> None:
    """One ``Adam.step`` of each optimizer, all their parameters updated at once.

    Each parameter gets the update its own optimizer gives it (its learning rate, step count
    and moments), so the affine fits of several starts step together as they would one by
    one. Fused optimizers run one ``torch._fused_adam_`` per learning rate; the unfused ones
    run torch's single-tensor arithmetic as ``torch._foreach_*`` operations (one operation for
    all the tensors, one fused kernel each on a GPU, the per-tensor kernels on a CPU).
    """
    if len({(opt.betas, opt.eps) for opt in optimizers}) > 1:
        raise ValueError("optimizers stepped together need the same betas and eps")
    fused = [opt for opt in optimizers if opt.fused]
    if fused:
        _step_fused(fused)
    if len(fused) < len(optimizers):
        _step_unfused([opt for opt in optimizers if not opt.fused])


def _step_fused(optimizers: list[Adam]) -> None:
    """``torch.optim.Adam(fused=True)``'s update: the step counts (tensors) up by one, then
    ``torch._fused_adam_`` over the parameters that share a learning rate."""
    groups: dict[float, tuple[list, ...]] = {}
    for opt in optimizers:
        for i, p in enumerate(opt.params):
            if p.grad is None:
                continue
            state = opt._state(i)
            group = groups.setdefault(opt.lr, ([], [], [], [], []))
            for lst, t in zip(group, (p, p.grad, state["exp_avg"], state["exp_avg_sq"], state["step"]), strict=True):
                lst.append(t)
    if not groups:
        return
    beta1, beta2 = optimizers[0].betas
    torch._foreach_add_([s for g in groups.values() for s in g[4]], 1.0)
    for lr, (params, grads, exp_avgs, exp_avg_sqs, steps) in groups.items():
        torch._fused_adam_(
            params,
            grads,
            exp_avgs,
            exp_avg_sqs,
            [],
            steps,
            lr=lr,
            beta1=beta1,
            beta2=beta2,
            weight_decay=0.0,
            eps=optimizers[0].eps,
            amsgrad=False,
            maximize=False,
        )


def _step_unfused(optimizers: list[Adam]) -> None:
    """``torch.optim.Adam(foreach=False)``'s update, op for op, as ``torch._foreach_*`` operations."""
    params, grads, exp_avgs, exp_avg_sqs, denoms, corrections2, step_sizes = [], [], [], [], [], [], []
    for opt in optimizers:
        beta1, beta2 = opt.betas
        for i, p in enumerate(opt.params):
            if p.grad is None:
                continue
            state = opt._state(i)
            state["step"] += 1.0
            params.append(p)
            grads.append(p.grad)
            exp_avgs.append(state["exp_avg"])
            exp_avg_sqs.append(state["exp_avg_sq"])
            denoms.append(opt._denominator(i, p))
            corrections2.append((1 - beta2 ** state["step"]) ** 0.5)
            step_sizes.append(-opt.lr / (1 - beta1 ** state["step"]))
    if not params:
        return
    beta1, beta2 = optimizers[0].betas
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, value=1 - beta2)
    # (sqrt(v) / bias_correction2_sqrt) + eps in buffers kept between steps: the same ops as
    # torch's, without two fresh parameter-sized tensors a step (their page faults cost half
    # of a 2 MB hash table's update)
    torch._foreach_copy_(denoms, exp_avg_sqs)
    torch._foreach_sqrt_(denoms)
    torch._foreach_div_(denoms, corrections2)
    torch._foreach_add_(denoms, optimizers[0].eps)
    torch._foreach_addcdiv_(params, exp_avgs, denoms, step_sizes)
