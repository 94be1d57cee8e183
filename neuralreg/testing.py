"""Checks the tests share (as kornia's ``testing``): float64 derivatives and closeness.

Use them to compare a backend or an analytic formula with its reference::

    from neuralreg.testing import assert_close, check_derivatives
    check_derivatives(lambda x, t: encode(x, t), (x64, table64))   # first and second
    assert_close(native_out, reference_out, atol=1e-6)
"""

from __future__ import annotations

import torch


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


__all__ = ["assert_close", "check_derivatives"]
