"""Backend selection: fallback to the reference, and the tinycudann backend where it exists."""

import os
import subprocess
import sys

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
