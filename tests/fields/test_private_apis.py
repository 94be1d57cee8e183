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


def test_a_lock_left_by_a_killed_build_is_removed_and_named(tmp_path, monkeypatch):
    """torch waits without limit for ``<build dir>/lock``; a killed build leaves it behind. An old
    one goes, with one warning naming it; then torch's own ``load`` finds no lock to wait for."""
    import os
    import time

    from torch.utils import cpp_extension

    from neuralreg.errors import NativeBuildWarning

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    folder = tmp_path / "neuralreg_lock_probe"
    assert cpp_extension._get_build_directory("neuralreg_lock_probe", verbose=False) == str(folder)
    folder.mkdir(exist_ok=True)
    lock = folder / "lock"
    lock.touch()
    old = time.time() - native.STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    with pytest.warns(NativeBuildWarning, match=f"removed the lock {lock}, left 11 min ago"):
        native.wait_for_build_lock("neuralreg_lock_probe")
    assert not lock.exists()


def test_a_build_in_progress_is_waited_for_not_broken(tmp_path, monkeypatch, capsys, recwarn):
    """A young lock belongs to a build that is running: wait until its owner releases it."""
    import threading

    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    lock = tmp_path / "neuralreg_lock_probe" / "lock"
    lock.parent.mkdir()
    lock.touch()
    seen = []

    def owner():  # the other build: it releases its lock once the waiter has said it waits
        for _ in range(400):  # at most about 20 s, so that a waiter that never speaks fails, not hangs
            if "waiting for another process's build" in "".join(seen):
                break
            seen.append(capsys.readouterr().err)
            threading.Event().wait(0.05)
        lock.unlink()

    thread = threading.Thread(target=owner)
    thread.start()
    native.wait_for_build_lock("neuralreg_lock_probe", poll_s=0.05)
    thread.join()
    assert not lock.exists()
    assert f"neuralreg: waiting for another process's build of the native kernels ({lock})" in "".join(seen)
    assert not [w for w in recwarn if "lock" in str(w.message)]
