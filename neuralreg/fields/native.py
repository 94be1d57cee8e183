"""Native kernels (``cuda_kernels/``): build on first use, status, and autograd wrappers.

Three builds of one op table (``cuda_kernels/ops.h``):
- ``cpu``: ``native_cpu.cpp``, the CPU twins;
- ``cuda``: ``native_cuda.cpp`` + ``hashgrid.cu`` + ``warp.cu``, where torch has CUDA and
  nvcc exists;
- ``emulated``: the same CUDA sources compiled as host C++ (``native_emulated.cpp``,
  ``cuda_compat.h``): every kernel launch run block by block on the CPU. Only for tests
  (``emulate_cuda()``): it checks the CUDA kernels' index math and atomics without a GPU.
Each is compiled with ``torch.utils.cpp_extension`` the first time it is needed (about a
minute, cached by torch in ``TORCH_EXTENSIONS_DIR``; the CPU build's name carries a hash
of this CPU's instruction-set flags, as it is built with ``-march=native``, so a cache
shared by different nodes never loads a binary on a CPU that cannot run it), never during
``pip install``: pip may build in an isolated environment where importing torch would
fetch another one. The sources ship inside the package (``neuralreg/_kernels`` in a
wheel). If a build fails, the PyTorch reference runs, with one ``NativeBuildWarning`` that
names the compiler's first error and the file holding the whole build output, and
``neuralreg.backends()`` says the same; an explicitly requested ``native`` backend is then an
error. Set ``NEURALREG_NATIVE=0`` to never try.

Exposed operations (same semantics as the references, tested against them):
- ``hashgrid_encode(x, table, layout, smoothstep)``: differentiable to second order in
  ``x`` and ``table`` (forward, backward and double-backward kernels);
- ``warp(image, points)``: fused linear sample returning values whose backward uses the
  spatial gradient computed in the same pass (``interpolation.sample_image`` semantics,
  zeros outside; gradient w.r.t. points only), of a scalar image or of a channel-last one
  (descriptors); ``sample_values`` the values alone.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import platform
import sys
import threading
import time
import warnings
from pathlib import Path

import torch

from neuralreg.errors import NativeBuildWarning

_lock = threading.Lock()
_modules: dict = {}
_errors: dict = {}
_cpu_route = {"kind": "cpu"}  # which build serves CPU tensors: "cpu" or "emulated" (tests)
KINDS = ("cpu", "cuda", "emulated")
STALE_LOCK_S = 600.0  # a build lock older than this was left by a killed build (a build takes 1-3 min)


def kernels_dir() -> Path | None:
    """The kernel sources: ``$NEURALREG_KERNELS_DIR`` where set (kernel development; pair it with
    its own ``TORCH_EXTENSIONS_DIR``), else ``cuda_kernels/`` of a checkout or ``neuralreg/_kernels``
    of a wheel."""
    if os.environ.get("NEURALREG_KERNELS_DIR"):
        return Path(os.environ["NEURALREG_KERNELS_DIR"])
    package = Path(__file__).resolve().parents[1]  # neuralreg/
    for candidate in (package.parent / "cuda_kernels", package / "_kernels"):
        if (candidate / "ops.h").is_file():
            return candidate
    try:  # an editable install maps the package neuralreg._kernels onto cuda_kernels/
        import importlib.util

        spec = importlib.util.find_spec("neuralreg._kernels")
        if spec is not None and spec.submodule_search_locations:
            for loc in spec.submodule_search_locations:
                if (Path(loc) / "ops.h").is_file():
                    return Path(loc)
    except (ImportError, ValueError):
        pass
    return None


def cpu_tag() -> str:
    """8 hex digits naming this CPU's instruction set (machine and its feature flags)."""
    flags = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = " ".join(sorted(line.split(":", 1)[1].split()))
                    break
    except OSError:
        pass
    return hashlib.sha1(f"{platform.machine()} {platform.processor()} {flags}".encode()).hexdigest()[:8]


def build_name(kind: str) -> str:
    """The torch extension name of a build (the CPU one keyed by ``cpu_tag()``)."""
    return f"neuralreg_native_cpu_{cpu_tag()}" if kind == "cpu" else f"neuralreg_native_{kind}"


def _build(kind: str, src: Path):
    from torch.utils import cpp_extension

    name = build_name(kind)
    try:
        cached = any(Path(cpp_extension._get_build_directory(name, verbose=False)).glob(f"{name}*.so"))
    except Exception:
        cached = False
    wait_for_build_lock(name)  # torch takes the build's lock even to load a cached build
    if not cached:
        print(f"neuralreg: building the native {kind.upper()} kernels (once, about a minute)...", file=sys.stderr)
    if kind in ("cpu", "emulated"):
        return cpp_extension.load(
            name=name,
            sources=[str(src / ("native_cpu.cpp" if kind == "cpu" else "native_emulated.cpp"))],
            extra_include_paths=[str(src)],
            extra_cflags=["-O3", "-std=c++17"] + (["-march=native", "-fopenmp"] if kind == "cpu" else ["-O1"]),
            extra_ldflags=["-fopenmp"] if kind == "cpu" else [],
            verbose=False,
        )
    if not torch.cuda.is_available() or cpp_extension.CUDA_HOME is None:
        raise RuntimeError("torch without CUDA, or no CUDA toolkit (nvcc)")
    return cpp_extension.load(
        name=name,
        sources=[str(src / source) for source in ("native_cuda.cpp", "hashgrid.cu", "warp.cu", "mi.cu")],
        extra_include_paths=[str(src)],
        extra_cflags=["-O3", "-std=c++17"],
        extra_cuda_cflags=["-O3", "-std=c++17"],
        verbose=False,
    )


def wait_for_build_lock(name: str, poll_s: float = 0.5) -> None:
    """Wait while another process builds extension ``name``; remove a lock left by a killed build.

    torch's ``cpp_extension.load`` takes ``<build dir>/lock`` while it builds and, finding the file,
    waits for it to go, without limit. A build killed midway (Ctrl-C, a job's time limit) leaves the
    file behind, and every later run would then hang silently. The lock is never touched while a
    build runs, so its age is the build's: one older than ``STALE_LOCK_S`` is removed with one
    ``NativeBuildWarning`` naming it; a younger one is waited for, with one line saying so.
    """
    from torch.utils import cpp_extension

    try:
        lock = Path(cpp_extension._get_build_directory(name, verbose=False)) / "lock"
    except Exception:
        return
    said = False
    while True:
        try:
            age = time.time() - lock.stat().st_mtime
        except OSError:  # no lock (or it just went): the build may start
            return
        if age > STALE_LOCK_S:
            with contextlib.suppress(OSError):
                lock.unlink()
            warnings.warn(
                f"removed the lock {lock}, left {age / 60:.0f} min ago by a build that did not finish",
                NativeBuildWarning,
                stacklevel=4,
            )
            return
        if not said:
            print(f"neuralreg: waiting for another process's build of the native kernels ({lock})", file=sys.stderr)
            said = True
        time.sleep(poll_s)


def _load(kind: str = "cpu"):
    """The compiled module for ``cpu``, ``cuda`` or ``emulated`` (built once), or None with the reason kept."""
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
            log = _keep_build_log(kind, f"{type(exc).__name__}: {exc}")
            _errors[kind] = f"build failed ({first_error(str(exc)) or type(exc).__name__}; full log: {log})"
            if kind == "cpu" or (kind == "cuda" and torch.cuda.is_available()):
                warnings.warn(
                    f"native {kind.upper()} kernels unavailable, the slower PyTorch reference runs: {_errors[kind]}",
                    NativeBuildWarning,
                    stacklevel=3,
                )
    return _modules.get(kind)


def first_error(text: str) -> str:
    """The compiler's first error line in a build's output (``file:line: error: ...``), else its first line."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for line in lines:
        if "error:" in line:  # g++ (file:line:col: error: ...) and nvcc (file(line): error: ...) alike
            return line[:300]
    return lines[0][:300] if lines else ""


def _keep_build_log(kind: str, text: str) -> str:
    """Write a failed build's whole output where torch keeps its extensions; the file's path."""
    from torch.utils.cpp_extension import get_default_build_root

    folder = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    path = folder / f"neuralreg_native_{kind}_build_error.log"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    except OSError:
        return "(not written)"
    return str(path)


def status(kind: str = "cpu") -> str:
    """One line: whether the ``cpu``, ``cuda`` or ``emulated`` kernels are loaded (building them if needed)."""
    if _load(kind) is not None:
        return f"available ({kind.upper()} extension)"
    return f"unavailable ({_errors[kind]})"


def _kind(device: torch.device | str) -> str:
    kind = torch.device(device).type
    return _cpu_route["kind"] if kind == "cpu" else kind


def hashgrid_available(device: torch.device | str = "cpu") -> bool:
    kind = _kind(device)
    return kind in KINDS and _load(kind) is not None


@contextlib.contextmanager
def emulate_cuda():
    """Within this block CPU tensors go to the emulated CUDA kernels (tests; slow, sequential)."""
    if _load("emulated") is None:
        raise RuntimeError(f"emulated CUDA kernels {status('emulated')}")
    before = _cpu_route["kind"]
    _cpu_route["kind"] = "emulated"
    try:
        yield
    finally:
        _cpu_route["kind"] = before


def ops(kind: str) -> list[str]:
    """The op names a build exposes (pybind11's own names left out)."""
    module = _load(kind)
    if module is None:
        raise RuntimeError(f"native kernels {status(kind)}")
    return sorted(n for n in dir(module) if not n.startswith("_"))


def _mod(t: torch.Tensor):
    kind = _kind(t.device)
    module = _load(kind)
    if module is None:
        raise RuntimeError(f"native kernels {status(kind)}")
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
    """(y, dy/dx) in one pass; backward to x and the table (first order). The kernel gives
    the Jacobian's rows (N, d, L*F) (along the identity's directions here); dy/dx is their
    transposed view."""

    @staticmethod
    def forward(ctx, x, table, layout, smooth):
        x, table = x.contiguous(), table.contiguous()
        eye = torch.eye(x.shape[1], dtype=x.dtype, device=x.device)
        ctx.save_for_backward(x, table, eye)
        ctx.layout, ctx.smooth = layout, smooth
        y, rows = _mod(x).hashgrid_forward_jacobian(x, table, eye, x.shape[0], *_layout_args(layout), smooth)
        return y, rows.transpose(1, 2)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, gy, gjac):
        x, table, eye = ctx.saved_tensors
        need_x, need_t = ctx.needs_input_grad[:2]
        if gy is None:
            gy = torch.zeros(x.shape[0], table.shape[1] * len(ctx.layout.scales), dtype=x.dtype, device=x.device)
        n_rows, g_rows = (0, gy.new_empty(0)) if gjac is None else (x.shape[0], gjac.transpose(1, 2))
        g_x, g_t = _mod(x).hashgrid_jacobian_backward(
            gy, g_rows, x, table, eye, n_rows, *_layout_args(ctx.layout), ctx.smooth, need_x, need_t
        )
        return (g_x if need_x else None), (g_t if need_t else None), None, None


def hashgrid_encode_with_jacobian(x: torch.Tensor, table: torch.Tensor, layout, smoothstep: bool):
    """Native encoding and its spatial Jacobian: (N, L*F) and (N, L*F, d), differentiable once."""
    _mod(x)
    return _HashGridEncodeJacobian.apply(x, table, layout, smoothstep)


class _Warp(torch.autograd.Function):
    @staticmethod
    def forward(ctx, image, points):
        values, grads = _mod(points).warp_forward(image.contiguous(), points.contiguous(), True)
        ctx.save_for_backward(grads)
        return values

    @staticmethod
    def backward(ctx, grad_out):
        (grads,) = ctx.saved_tensors
        if grads.dim() == 3:  # channels: (N, C) against (N, C, d)
            return None, torch.einsum("nc,ncd->nd", grad_out, grads)
        return None, grad_out[:, None] * grads


def warp(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Fused linear sample at voxel-index ``points`` (N, d) of a scalar ``image`` (*spatial) ->
    (N,), or of a channel-last one (*spatial, C) -> (N, C) (each vertex's C values contiguous:
    one set of corner weights serves them all)."""
    _mod(points)
    if image.requires_grad:
        raise ValueError("the fused warp differentiates with respect to points only")
    return _Warp.apply(image.to(points.dtype), points)


def sample_values(image: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``warp``'s values without its spatial gradient (not differentiable): e.g. the fixed image at its own points
    ((N,) of an image (*spatial), (N, C) of a channel-last one (*spatial, C))."""
    with torch.no_grad():
        values, _ = _mod(points).warp_forward(image.to(points.dtype).contiguous(), points.contiguous(), False)
    return values
