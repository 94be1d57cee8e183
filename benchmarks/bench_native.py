"""Native kernels vs the PyTorch reference on this machine (ratios measured in one run, medians).

- fused warp forward+backward at 64k points on an 80x192x192 volume vs grid_sample;
- hash-grid forward+backward (16k and 64k points) native vs reference;
- one full GradICON optimization step (both fields, 16k similarity points per field,
  4k GradICON points, Adam update) native vs reference, with the autograd Jacobian and
  with the analytic one (``RegistrationConfig(jacobian="analytic")``).

    python benchmarks/bench_native.py [--threads N]
"""

from __future__ import annotations

import argparse

import torch
from timing import median_ms

from neuralreg import FieldConfig, HashGridEncoding, NeuralField
from neuralreg.fields import native
from neuralreg.geometry.interpolation import sample_image
from neuralreg.losses import regularizers
from neuralreg.losses.similarity import lncc


def bench_warp() -> tuple[float, float]:
    g = torch.Generator().manual_seed(0)
    image = torch.rand(80, 192, 192, generator=g)
    upper = torch.tensor([79.0, 191.0, 191.0])
    pts0 = torch.rand(65536, 3, generator=g) * upper

    def run(fn):
        def step():
            p = pts0.clone().requires_grad_(True)
            fn(image, p).sum().backward()

        return median_ms(step)

    return run(sample_image), run(native.warp)


def bench_encoding(n: int) -> tuple[float, float]:
    enc = HashGridEncoding(3, FieldConfig().encoding)
    x0 = torch.rand(n, 3)

    def run(backend):
        enc.backend = backend

        def step():
            enc.table.grad = None
            x = x0.clone().requires_grad_(True)
            enc(x).square().sum().backward()

        return median_ms(step)

    return run("torch"), run("native")


def bench_gradicon_step() -> tuple[float, float, float]:
    torch.manual_seed(0)
    fa, fb = NeuralField(3, FieldConfig()), NeuralField(3, FieldConfig())
    for f in (fa, fb):
        torch.nn.init.normal_(f.mlp[-1].weight, std=1e-2)
    opt = torch.optim.Adam(list(fa.parameters()) + list(fb.parameters()), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    image = torch.rand(80, 192, 192, generator=g)
    scale = torch.tensor([79.0, 191.0, 191.0])
    sim_points = torch.rand(16384, 3, generator=g)
    reg_points = torch.rand(4096, 3, generator=g)

    def run(backend, gradicon=regularizers.gradicon):
        for f in (fa, fb):
            f.encoding.backend = backend
        warp = native.warp if backend == "native" else sample_image

        def step():
            opt.zero_grad()
            loss = 0.0
            for f in (fa, fb):
                w = warp(image, f(sim_points) * scale).reshape(-1, 32)
                loss = loss + lncc(w, sample_image(image, sim_points * scale).reshape(-1, 32))
            loss = loss + gradicon(fa, fb, reg_points)
            loss.backward()
            opt.step()

        return median_ms(step, 3)

    return run("torch"), run("native"), run("native", regularizers.gradicon_analytic)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if not native.hashgrid_available():
        raise SystemExit(f"native kernels {native.status()}")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    ref, nat = bench_warp()
    print(
        f"  fused warp fwd+bwd, 64k pts, 80x192x192: grid_sample {ref:8.1f} ms, native {nat:8.1f} ms, x{ref / nat:.1f}"
    )
    for n in (16384, 65536):
        ref, nat = bench_encoding(n)
        print(f"  hash grid fwd+bwd @ {n:6d} pts: reference {ref:8.1f} ms, native {nat:8.1f} ms, x{ref / nat:.1f}")
    ref, nat, ana = bench_gradicon_step()
    print(f"  full GradICON step (2 fields, 16k sim pts): reference {ref:8.1f} ms")
    print(f"    native, autograd Jacobian: {nat:8.1f} ms, x{ref / nat:.1f}")
    print(f"    native, analytic Jacobian: {ana:8.1f} ms, x{ref / ana:.1f}")


if __name__ == "__main__":
    main()
