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
        self.state: dict[int, dict] = {}  # index in ``params`` -> step (a float, on the host), exp_avg, exp_avg_sq
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
            state = self.state[i] = {
                "step": 0.0,
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

    The update runs over every parameter that has a gradient (``torch._foreach_*``: one
    operation for all the tensors, one fused kernel each on a GPU, the per-tensor kernels on
    a CPU), with torch's single-tensor arithmetic, op for op: each parameter gets the update
    its own optimizer gives it (its learning rate, step count and moments), so the affine
    fits of several starts step together as they would one by one.
    """
    params, grads, exp_avgs, exp_avg_sqs, denoms, corrections2, step_sizes = [], [], [], [], [], [], []
    for opt in optimizers:
        beta1, beta2 = opt.betas
        for i, p in enumerate(opt.params):
            if p.grad is None:
                continue
            state = opt._state(i)
            # the step count lives on the host: torch's is a CPU tensor read back by .item()
            # every step, the same float without a read
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
    if len({(opt.betas, opt.eps) for opt in optimizers}) > 1:
        raise ValueError("optimizers stepped together need the same betas and eps")
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
