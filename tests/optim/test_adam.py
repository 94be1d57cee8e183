"""neuralreg's Adam against torch.optim.Adam: the same bits, step by step and for a whole registration."""

import copy
import subprocess
import sys

import pytest
import torch

from neuralreg import RegistrationConfig, register_pair
from neuralreg.optim.adam import FUSED_MIN_ELEMENTS, Adam, fused_available, step_together
from neuralreg.optim.registration import PairRegistration
from neuralreg.phantoms import triangles_pair


def _params(seed):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(300, 2, generator=g).requires_grad_(), torch.randn(7, generator=g).requires_grad_()]


@pytest.mark.parametrize("fused", [False, True])
def test_steps_are_bit_for_bit_those_of_torch_optim_adam_with_a_schedule_and_a_restore(fused):
    ours, theirs = _params(0), _params(0)
    opt, ref = Adam(ours, 2e-3, fused=fused), torch.optim.Adam(theirs, lr=2e-3, fused=fused, foreach=False)
    assert opt.fused is fused
    g = torch.Generator().manual_seed(1)
    snapshot = None
    for step in range(40):
        grads = [torch.randn(p.shape, generator=g) * 10.0 ** (step % 3 - 1) for p in ours]
        lr = 2e-3 * (0.1 + 0.9 * (1 - step / 40))
        opt.lr = lr
        for group in ref.param_groups:
            group["lr"] = lr
        for k, (a, b) in enumerate(zip(ours, theirs, strict=True)):
            skip = k == 1 and step % 5 == 0  # a parameter without a gradient keeps its state and step count
            a.grad = None if skip else grads[k].clone()
            b.grad = None if skip else grads[k].clone()
        opt.step()
        ref.step()
        if step == 10:
            snapshot = copy.deepcopy(([p.detach().clone() for p in ours], opt.state_dict()))
            ref_snapshot = copy.deepcopy(([p.detach().clone() for p in theirs], ref.state_dict()))
        for a, b in zip(ours, theirs, strict=True):
            assert torch.equal(a, b), f"step {step}"
    # back to the snapshot, then the same steps again
    with torch.no_grad():
        for p, v in zip(ours, snapshot[0], strict=True):
            p.copy_(v)
        for p, v in zip(theirs, ref_snapshot[0], strict=True):
            p.copy_(v)
    opt.load_state_dict(snapshot[1])
    ref.load_state_dict(ref_snapshot[1])
    for _ in range(5):
        for a, b in zip(ours, theirs, strict=True):
            grad = torch.randn(a.shape, generator=g)
            a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        ref.step()
    for a, b in zip(ours, theirs, strict=True):
        assert torch.equal(a, b)
    opt.zero_grad()
    assert all(p.grad is None for p in ours)


def test_fused_is_the_default_for_large_parameters_where_torch_has_the_kernel_and_an_error_where_it_has_none():
    assert fused_available("cpu")  # the CPU's kernel came with torch 2.4; CI installs a newer torch
    assert Adam([torch.zeros(FUSED_MIN_ELEMENTS // 2, 2, requires_grad=True)], 1e-3).fused  # a hash table
    assert not Adam(_params(0), 1e-3).fused  # an affine part's few numbers
    assert not fused_available("meta")
    assert not Adam([torch.zeros(3, device="meta", requires_grad=True)], 1e-3).fused
    with pytest.raises(ValueError, match="no fused Adam on meta"):
        Adam([torch.zeros(3, device="meta", requires_grad=True)], 1e-3, fused=True)


def test_optimizers_stepped_together_step_as_they_would_one_by_one():
    """Fused and unfused optimizers, two learning rates, a parameter without a gradient."""
    together = [_params(s) for s in range(4)]
    alone = [[p.detach().clone().requires_grad_() for p in ps] for ps in together]
    lrs, fused = [1e-2, 1e-2, 3e-3, 1e-2], [True, True, True, False]
    opts = [Adam(ps, lr, fused=f) for ps, lr, f in zip(together, lrs, fused, strict=True)]
    refs = [Adam(ps, lr, fused=f) for ps, lr, f in zip(alone, lrs, fused, strict=True)]
    g = torch.Generator().manual_seed(2)
    for step in range(6):
        for ps, qs in zip(together, alone, strict=True):
            for k, (p, q) in enumerate(zip(ps, qs, strict=True)):
                grad = None if (k == 1 and step % 2) else torch.randn(p.shape, generator=g)
                p.grad, q.grad = grad, None if grad is None else grad.clone()
        step_together(opts)
        for ref in refs:
            ref.step()
    for ps, qs in zip(together, alone, strict=True):
        for p, q in zip(ps, qs, strict=True):
            assert torch.equal(p, q)
    moved = [not torch.equal(p, q) for p, q in zip(together[0], _params(0), strict=True)]
    assert all(moved)


@pytest.mark.filterwarnings("ignore::neuralreg.RegistrationWarning")  # 30 steps: bits, not quality
def test_a_registration_is_bit_for_bit_the_one_torch_optim_adam_gives():
    pair = triangles_pair(1)
    cfg = RegistrationConfig(steps=30, affine_steps=20, points=512)
    ours = register_pair(pair["moving"], pair["fixed"], cfg)

    class TorchAdam(torch.optim.Adam):  # torch's, behind neuralreg's interface
        def __init__(self, params, lr):
            params = list(params)
            fused = sum(p.numel() for p in params) >= FUSED_MIN_ELEMENTS  # neuralreg's default on this torch
            super().__init__(params, lr=lr, fused=fused, foreach=False)

        @property
        def lr(self):
            return self.param_groups[0]["lr"]

        @lr.setter
        def lr(self, value):
            for group in self.param_groups:
                group["lr"] = value

        def zero_grad(self):
            super().zero_grad(set_to_none=True)

    made = []
    theirs = PairRegistration(
        pair["moving"], pair["fixed"], cfg, optimizer=lambda p, lr: made.append(TorchAdam(p, lr)) or made[-1]
    ).run()
    assert {opt.defaults["fused"] for opt in made} == {False, True}  # the affine fits, the fields
    for a, b in ((ours.phi_ab, theirs.phi_ab), (ours.phi_ba, theirs.phi_ba)):
        for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
            assert torch.equal(x, y), name
    assert torch.equal(ours.affine.matrix(), theirs.affine.matrix())


@pytest.mark.parametrize("module", ["neuralreg.cli", "neuralreg.optim.registration"])
def test_registering_does_not_import_torch_dynamo(module):
    """torch.optim's first optimizer imports torch._dynamo (about 1 s of every command)."""
    code = (
        f"import sys, {module}\n"
        "from neuralreg import RegistrationConfig, register_pair\n"
        "from neuralreg.phantoms import triangles_pair\n"
        "p = triangles_pair(0)\n"
        "cfg = RegistrationConfig(steps=3, affine_steps=2, points=64)\n"
        "register_pair(p['moving'], p['fixed'], cfg)\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().splitlines()[-1] == "False"
