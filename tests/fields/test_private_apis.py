"""The private APIs of torch and tinycudann that neuralreg relies on: a change in them fails
here, loudly, instead of slowing a run down (each has a fallback) or breaking a GPU run."""

from typing import ClassVar

import pytest
import torch

from neuralreg.fields import native


def test_cpp_extension_names_its_build_directory():
    """``native._build`` asks it whether a build is cached (to say "building..." only when it is not)."""
    from torch.utils import cpp_extension

    folder = cpp_extension._get_build_directory("neuralreg_private_api_probe", verbose=False)
    assert isinstance(folder, str) and folder.endswith("neuralreg_private_api_probe")


class _Probe(torch.autograd.Function):
    """y = x * w, recording in backward whether the engine will use w's gradient."""

    seen: ClassVar[list] = []

    @staticmethod
    def forward(ctx, x, w):
        ctx.save_for_backward(x, w)
        return x * w

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        _Probe.seen.append(native._engine_needs(ctx, 1))
        return grad * w, (grad * x).sum()


def test_the_engine_says_which_gradients_a_backward_pass_uses():
    """``torch._C._will_engine_execute_node``: a spatial-gradient pass (``autograd.grad`` with
    respect to the points, GradICON's) skips the table's gradient; a training step computes it."""
    assert hasattr(torch._C, "_will_engine_execute_node")
    x = torch.rand(5, requires_grad=True)
    w = torch.tensor(2.0, requires_grad=True)
    _Probe.seen.clear()
    torch.autograd.grad(_Probe.apply(x, w).sum(), x)
    _Probe.apply(x, w).sum().backward()
    assert _Probe.seen == [False, True]


def test_tinycudann_exposes_its_module_function():
    tcnn = pytest.importorskip("tinycudann", reason="tinycudann is installed by hand on CUDA machines only")
    assert hasattr(tcnn.modules, "_module_function") and hasattr(tcnn._C, "batch_size_granularity")
