"""Checks the tests share (as kornia's ``testing``): float64 derivatives and closeness.

Use them to compare a backend or an analytic formula with its reference::

    from neuralreg.testing import assert_close, check_derivatives
    check_derivatives(lambda x, t: encode(x, t), (x64, table64))   # first and second
    assert_close(native_out, reference_out, atol=1e-6)

``OpCounter`` counts the aten operations a block dispatches, and those that make a GPU wait
for the host (``syncs``), on any device: the tests and ``benchmarks/step_ops.py`` count a
step's with it.
"""

from __future__ import annotations

import collections

import torch
from torch.utils._python_dispatch import TorchDispatchMode

# aten operations whose result the host must wait for (a value or a shape read back)
SYNCING = ("_local_scalar_dense", "nonzero", "item", "masked_select", "unique", "_unique2", "equal", "is_nonzero")


class OpCounter(TorchDispatchMode):
    """Counts every aten operation dispatched inside ``with OpCounter() as c:``, by name."""

    def __init__(self):
        super().__init__()
        self.ops: collections.Counter = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[func.overloadpacket.__name__] += 1
        return func(*args, **(kwargs or {}))

    def syncs(self) -> dict:
        """The operations that synchronise with the host, by name."""
        return {name: n for name, n in self.ops.items() if name.startswith(SYNCING)}


def check_derivatives(fn, inputs, eps: float = 1e-6, atol: float = 1e-6, second_atol: float | None = 1e-5) -> None:
    """``gradcheck`` and (unless ``second_atol`` is None) ``gradgradcheck`` of ``fn`` at ``inputs``.

    Every floating input must be float64 (finite differences in float32 cannot tell a
    wrong derivative from rounding); raises AssertionError naming the failing order.
    """
    for t in inputs:
        if torch.is_tensor(t) and t.is_floating_point() and t.dtype != torch.float64:
            raise AssertionError(f"check_derivatives needs float64 inputs, got {t.dtype}")
    assert torch.autograd.gradcheck(fn, inputs, eps=eps, atol=atol), "first derivatives differ"
    if second_atol is not None:
        assert torch.autograd.gradgradcheck(fn, inputs, eps=eps, atol=second_atol), "second derivatives differ"


def assert_close(actual, expected, rtol: float = 1e-5, atol: float = 1e-6, msg: str | None = None) -> None:
    """``torch.testing.assert_close`` after both sides are float64 tensors on the CPU."""
    a = torch.as_tensor(actual).detach().double().cpu()
    b = torch.as_tensor(expected).detach().double().cpu()
    torch.testing.assert_close(a, b, rtol=rtol, atol=atol, msg=msg)


__all__ = ["SYNCING", "OpCounter", "assert_close", "check_derivatives"]
