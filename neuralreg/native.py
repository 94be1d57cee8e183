"""Native kernels (``cuda_kernels/``): build on first use, status, and autograd wrappers.

The CPU extension (``native_cpu.cpp``) and, where torch has CUDA and nvcc exists, the
CUDA one (``native_cuda.cpp`` + ``hashgrid.cu`` + ``warp.cu``) are compiled with
``torch.utils.cpp_extension`` the first time they are needed (about a minute, cached by
torch in ``TORCH_EXTENSIONS_DIR``), never during
``pip install``: pip may build in an isolated environment where importing torch would
fetch another one. If it cannot be built, the PyTorch reference runs, with one warning.
Set ``NEURALREG_NATIVE=0`` to never try.

Exposed operations (same semantics as the references, tested against them):
- ``hashgrid_encode(x, table, layout, smoothstep)``: differentiable to second order in
  ``x`` and ``table`` (forward, backward and double-backward kernels);
- ``warp(image, points)``: fused linear sample returning values whose backward uses the
  spatial gradient computed in the same pass (``sampling.sample_image`` semantics,
  zeros outside; gradient w.r.t. points only).
"""

from __future__ import annotations

import os
import sys
import threading
import warnings
from pathlib import Path

import torch

_lock = threading.Lock()
_modules: dict = {}
_errors: dict = {}


def kernels_dir() -> Path | None:
    """The ``cuda_kernels`` folder of a source checkout or editable install."""
    here = Path(__file__).resolve().parent
    for candidate in (here.parent / "cuda_kernels", here / "cuda_kernels"):
        if (candidate / "pointmath.h").is_file():
            return candidate
    return None


def _build(kind: str, src: Path):
    from torch.utils import cpp_extension

    name = f"neuralreg_native_{kind}"
    try:
        cached = any(Path(cpp_extension._get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:
        cached = False
    if not cached:
        print(f"neuralreg: building the native {kind.upper()} kernels (once, about a minute)...", file=sys.stderr)
    if kind == "cpu":
        return cpp_extension.load(
            name="neuralreg_native_cpu",
            sources=[str(src / "native_cpu.cpp")],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", "-march=native", "-fopenmp", "-std=c++17"],
            extra_ldflags=["-fopenmp"],
            verbose=False,
        )
    if not torch.cuda.is_available() or cpp_extension.CUDA_HOME is None:
        raise RuntimeError("torch without CUDA, or no CUDA toolkit (nvcc)")
    return cpp_extension.load(
        name="neuralreg_native_cuda",
        sources=[str(src / "native_cuda.cpp"), str(src / "hashgrid.cu"), str(src / "warp.cu")],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        verbose=False,
    )


def _load(kind: str = "cpu"):
    """The compiled module for ``cpu`` or ``cuda`` (built once), or None with the reason kept."""
    if kind in _modules or kind in _errors:
        return _modules.get(kind)
    with _lock:
        if kind in _modules or kind in _errors:
            return _modules.get(kind)
        if os.environ.get("NEURALREG_NATIVE", "1") == "0":
            _errors[kind] = "disabled by NEURALREG_NATIVE=0"
            return None
        src = kernels_dir()
        if src is None:
            _errors[kind] = "kernel sources (cuda_kernels/) not found next to the package"
            return None
        try:
            _modules[kind] = _build(kind, src)
        except Exception as exc:  # compiler, ninja or CUDA toolkit missing, build error
            first = str(exc).splitlines()[0] if str(exc) else ""
            _errors[kind] = f"build failed ({type(exc).__name__}: {first})"
            if kind == "cpu" or torch.cuda.is_available():
                warnings.warn(f"neuralreg native {kind} kernels unavailable: {_errors[kind]}", stacklevel=3)
    return _modules.get(kind)


def status(kind: str = "cpu") -> str:
    """One line: whether the native kernels for ``cpu`` or ``cuda`` are loaded (building them if needed)."""
    if _load(kind) is not None:
        return f"available ({kind.upper()} extension)"
    return f"unavailable ({_errors[kind]})"


def hashgrid_available(device: torch.device | str = "cpu") -> bool:
    kind = torch.device(device).type
    return kind in ("cpu", "cuda") and _load(kind) is not None


def _mod(t: torch.Tensor):
    module = _load(t.device.type)
    if module is None:
        raise RuntimeError(f"native kernels {status(t.device.type)}")
    return module


def _layout_args(layout):
    return (
        list(layout.scales),
        list(layout.resolutions),
        list(layout.sizes),
        list(layout.offsets),
        list(layout.hashed),
    )


def _engine_needs(ctx, index: int) -> bool:
    """Whether the running backward pass will use the gradient of input ``index``.

    ``autograd.grad(y, x)`` (the Jacobian passes of GradICON) does not need the table's
    gradient although the table requires grad; skipping it halves those kernels.
    """
    if not ctx.needs_input_grad[index]:
        return False
    node = ctx.next_functions[index][0]
    if node is None:
        return False
    try:
        return bool(torch._C._will_engine_execute_node(node))
    except (AttributeError, RuntimeError):  # private API; fall back to computing it
        return True


class _HashGridEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, table, layout, smooth):
        x, table = x.contiguous(), table.contiguous()
        ctx.save_for_backward(x, table)
        ctx.layout, ctx.smooth = layout, smooth
        return _mod(x).hashgrid_forward(x, table, *_layout_args(layout), smooth)

    @staticmethod
    def backward(ctx, gy):
        x, table = ctx.saved_tensors
        need_x, need_t = _engine_needs(ctx, 0), _engine_needs(ctx, 1)
        if not (need_x or need_t):
            return None, None, None, None
        gx, gt = _HashGridBackward.apply(gy, x, table, ctx.layout, ctx.smooth, need_x, need_t)
        return gx, gt, None, None


class _HashGridBackward(torch.autograd.Function):
    """(gx, gT) = backward(gy, x, T); its own backward is the double-backward kernel."""

    @staticmethod
    def forward(ctx, gy, x, table, layout, smooth, need_x, need_t):
        gy = gy.contiguous()
        ctx.save_for_backward(gy, x, table)
        ctx.layout, ctx.smooth = layout, smooth
        gx, gt = _mod(x).hashgrid_backward(gy, x, table, *_layout_args(layout), smooth, need_x, need_t)
        return (gx if need_x else None), (gt if need_t else None)

    @staticmethod
    def backward(ctx, ggx, ggt):
        gy, x, table = ctx.saved_tensors
        need_gy, need_x, need_t = ctx.needs_input_grad[:3]
        g_gy, g_x, g_t = _mod(x).hashgrid_double_backward(
            ggx, ggt, gy, x, table, *_layout_args(ctx.layout), ctx.smooth, need_gy, need_x, need_t
        )
        return (g_gy if need_gy else None), (g_x if need_x else None), (g_t if need_t else None), None, None, None, None


def hashgrid_encode(x: torch.Tensor, table: torch.Tensor, layout, smoothstep: bool) -> torch.Tensor:
    """Native hash-grid encoding: x (N, d) in [0,1]^d, table (rows, F) -> (N, L*F)."""
    _mod(x)
    return _HashGridEncode.apply(x, table, layout, smoothstep)


class _HashGridEncodeJacobian(torch.autograd.Function):
    """(y, dy/dx) in one pass; backward to x and the table (first order)."""

    @staticmethod
    def forward(ctx, x, table, layout, smooth):
        x, table = x.contiguous(), table.contiguous()
        ctx.save_for_backward(x, table)
        ctx.layout, ctx.smooth = layout, smooth
        return tuple(_mod(x).hashgrid_forward_jacobian(x, table, *_layout_args(layout), smooth))

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gjac):
        x, table = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[:2]
        if gy is None:
            gy = torch.zeros(x.shape[0], table.shape[1] * len(ctx.layout.scales), dtype=x.dtype)
        if gjac is None:
            gjac = torch.zeros(*gy.shape, x.shape[1], dtype=x.dtype)
        g_x, g_t = _mod(x).hashgrid_jacobian_backward(
            gy, gjac, x, table, *_layout_args(ctx.layout), ctx.smooth, need_x, need_t
        )
        return (g_x if need_x else None), (g_t if need_t else None), None, None


def hashgrid_encode_with_jacobian(x: torch.Tensor, table: torch.Tensor, layout, smoothstep: bool):
    """Native encoding and its spatial Jacobian: (N, L*F) and (N, L*F, d), differentiable once."""
    _mod(x)
    return _HashGridEncodeJacobian.apply(x, table, layout, smoothstep)


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, points):
        values, grads = _mod(points).warp_forward(image.contiguous(), points.contiguous())
        ctx.save_for_backward(grads)
        return values

    @staticmethod
    def backward(ctx, grad_out):
        (grads,) = ctx.saved_tensors
        return None, grad_out[:, None] * grads


def warp(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Fused linear sample of a scalar ``image`` (*spatial) at voxel-index ``points`` (N, d) -> (N,)."""
    _mod(points)
    if image.requires_grad:
        raise ValueError("the fused warp differentiates with respect to points only")
    return _Warp.apply(image.to(points.dtype), points)
