"""Backend selection: fallback to the reference, and the tinycudann backend where it exists."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from neuralreg import FieldConfig, HashGridConfig, HashGridEncoding, backends
from neuralreg.fields import tcnn as tcnn_backend


def test_backends_report_every_backend():
    report = backends()
    assert set(report) == {"torch", "native", "tcnn"}
    assert report["torch"].startswith("available")


def test_native_disabled_auto_falls_back_and_an_explicit_request_is_an_error():
    code = (
        "import neuralreg, warnings;"
        "from neuralreg import FieldConfig, InputError, NeuralField;"
        "print(neuralreg.backends()['native']);"
        "f = NeuralField(2, FieldConfig(backend='auto')); f.set_backend('auto'); print(f.encoding.backend);"
        "warnings.simplefilter('error');"
        "import pytest\n"
        "with pytest.raises(InputError) as e: f.set_backend('native')\n"
        "print(e.value)"
    )
    env = {**os.environ, "NEURALREG_NATIVE": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert out.split("\n")[:3] == [
        "unavailable (disabled by NEURALREG_NATIVE=0)",
        "torch",
        "native hash-grid backend requested but unavailable (disabled by NEURALREG_NATIVE=0); "
        "use backend auto or torch",
    ]


@pytest.mark.skipif(not tcnn_backend.is_available(), reason=f"tinycudann backend: {tcnn_backend.status()}")
@pytest.mark.parametrize("interp", ["Linear", "Smoothstep"])
def test_tcnn_matches_reference(interp):
    cfg = HashGridConfig(n_levels=6, log2_hashmap_size=12, base_resolution=4, per_level_scale=1.5, interpolation=interp)
    enc = HashGridEncoding(3, cfg).cuda()
    torch.nn.init.uniform_(enc.table, -1, 1)
    x = torch.rand(4096, 3, device="cuda", requires_grad=True)
    enc.backend = "torch"
    ref = enc(x)
    (gref,) = torch.autograd.grad(ref.square().sum(), x)
    enc.set_backend("tcnn")
    got = enc(x)
    (ggot,) = torch.autograd.grad(got.square().sum(), x)
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(ggot, gref, rtol=1e-3, atol=1e-3)
    assert FieldConfig(backend="tcnn").backend == "tcnn"


@pytest.mark.slow
def test_a_failed_build_is_loud_and_names_the_compilers_first_error(tmp_path):
    """A kernel source that does not compile: one warning line with the compiler's error and
    the log's path, the reference runs, and report.json says which backend ran."""
    import json
    import shutil

    from neuralreg.fields import native
    from neuralreg.io import write_image
    from neuralreg.phantoms import triangles_pair

    broken = tmp_path / "kernels"
    shutil.copytree(native.kernels_dir(), broken)
    source = broken / "native_cpu.cpp"
    # a header that is missing stops the compiler at once (a syntax error deep in the file
    # costs the parse of torch's headers, twice)
    source.write_text('#include "this_is_not_cpp.h"\n' + source.read_text())
    pair = triangles_pair(1, size=24)
    write_image(pair["fixed"], tmp_path / "f.nii.gz")
    env = {**os.environ, "NEURALREG_KERNELS_DIR": str(broken), "TORCH_EXTENSIONS_DIR": str(tmp_path / "ext")}
    cmd = [sys.executable, "-m", "neuralreg", "register", "--fixed", str(tmp_path / "f.nii.gz")]
    cmd += ["--moving", str(tmp_path / "f.nii.gz"), "--out", str(tmp_path / "o"), "--steps", "3", "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    warned = [line for line in proc.stderr.splitlines() if "native CPU kernels unavailable" in line]
    assert len(warned) == 1 and warned[0].startswith("neuralreg: warning:"), proc.stderr
    assert "native_cpu.cpp" in warned[0] and "error:" in warned[0] and "this_is_not_cpp" in warned[0]
    log = Path(warned[0].split("full log: ")[1].rstrip(")"))
    assert log.is_file() and "this_is_not_cpp" in log.read_text()
    assert json.loads((tmp_path / "o" / "report.json").read_text())["backend"] == "torch"
    cmd[cmd.index("--out") + 1] = str(tmp_path / "o2")
    explicit = subprocess.run([*cmd, "--backend", "native"], capture_output=True, text=True, env=env)
    assert explicit.returncode == 2 and "native hash-grid backend requested but unavailable" in explicit.stderr
    assert not (tmp_path / "o2").exists()
