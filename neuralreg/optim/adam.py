"""Adam with the arithmetic of ``torch.optim.Adam``'s single-tensor path, without ``torch.optim``.

``torch.optim.Optimizer`` imports ``torch._dynamo`` on its first use (about 1 s, a thirtieth of a
knee registration's whole command on a 2-core machine). This is the same update, op for op
(``torch.optim.Adam(params, lr)`` with its defaults: betas (0.9, 0.999), eps 1e-8, no weight
decay, no amsgrad, on the CPU the single-tensor loop), so a registration is bit for bit the
one ``torch.optim.Adam`` gives (``tests/optim/test_adam.py``).
"""

from __future__ import annotations

import torch


class Adam:
    """Adam over a list of parameters, one learning rate for all.

    Attributes:
        lr: the learning rate of the next ``step`` (set it to schedule).
        betas, eps: Adam's constants (torch's defaults).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        self.params = list(params)
        self.lr = float(lr)
        self.betas = betas
        self.eps = eps
        self.state: dict[int, dict] = {}  # index in ``params`` -> step (float32 scalar tensor), exp_avg, exp_avg_sq
        self._scratch: dict[int, torch.Tensor] = {}  # index -> the denominator's buffer (no state)

    def zero_grad(self) -> None:
        """Drop the gradients (``set_to_none=True``: the backward pass allocates them anew)."""
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One update of every parameter that has a gradient (the others keep their state and step count)."""
        beta1, beta2 = self.betas
        lr, eps = self.lr, self.eps
        for i, param in enumerate(self.params):
            grad = param.grad
            if grad is None:
                continue
            state = self.state.get(i)
            if state is None:
                state = self.state[i] = {
                    "step": torch.tensor(0.0),
                    "exp_avg": torch.zeros_like(param, memory_format=torch.preserve_format),
                    "exp_avg_sq": torch.zeros_like(param, memory_format=torch.preserve_format),
                }
            exp_avg, exp_avg_sq, step_t = state["exp_avg"], state["exp_avg_sq"], state["step"]
            step_t += 1
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            step = step_t.item()
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = self._scratch.get(i)
            if denom is None:
                denom = self._scratch[i] = torch.empty_like(param, memory_format=torch.preserve_format)
            # (sqrt(v) / bias_correction2_sqrt) + eps in a buffer kept between steps: the same
            # ops as torch's, without two fresh parameter-sized tensors a step (their page faults
            # cost half of a 2 MB hash table's update)
            torch.sqrt(exp_avg_sq, out=denom).div_(bias_correction2_sqrt).add_(eps)
            param.addcdiv_(exp_avg, denom, value=-step_size)

    def state_dict(self) -> dict:
        """The learning rate and the moments (references: copy them to keep a snapshot)."""
        return {"lr": self.lr, "state": self.state}

    def load_state_dict(self, state: dict) -> None:
        """Take the learning rate and the moments of ``state_dict`` (copies of the tensors)."""
        self.lr = float(state["lr"])
        self.state = {i: {k: v.clone() for k, v in s.items()} for i, s in state["state"].items()}
