"""One command for the first machine with a GPU: build, test and time the CUDA path.

    python benchmarks/gpu_check.py --out gpu.json

1. builds the CUDA extension (``native.status("cuda")``, with its build time);
2. runs the CUDA-parametrized kernel tests (``tests/test_native.py -k cuda``: values,
   first and second derivatives, Jacobian kernels and warp against the float64 reference);
3. times the kernels (medians): hash-grid forward+backward, encoding with Jacobian
   forward+backward, fused warp forward+backward, native and, where installed, tinycudann;
4. registers an 80x192x192 knee phantom pair on the GPU with the native backend and, where
   installed, tinycudann (whole ``register_pair`` call: wall seconds, seconds per step,
   bone Dice, quality verdict);
and writes every number to one JSON file. Exit status 1 if a step failed (the JSON says
which), 2 if there is no GPU.

``--smoke`` runs the same script on the CPU with the emulated CUDA kernels and a small
pair, to check the script itself on a machine without a GPU.
"""

from __future__ import annotations

import argparse
import json
import platform
import re
import subprocess
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def median_ms(fn, device: str, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return float(sorted(times)[len(times) // 2])


def run_tests(selection: str) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", str(ROOT / "tests" / "test_native.py"), "-k", selection]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    return {"command": " ".join(cmd[2:]), "exit_code": proc.returncode, "summary": tail, **counts}


def time_kernels(device: str, n: int, backends: list[str]) -> dict:
    from neuralreg import FieldConfig, HashGridEncoding
    from neuralreg.fields import native

    out = {}
    g = torch.Generator().manual_seed(0)
    x0 = torch.rand(n, 3, generator=g).to(device)
    for backend in backends:
        enc = HashGridEncoding(3, FieldConfig().encoding).to(device)
        enc.set_backend(backend)

        def encode_step(enc=enc):
            enc.table.grad = None
            x = x0.clone().requires_grad_(True)
            enc(x).square().sum().backward()

        out[f"{backend}_hashgrid_fwd_bwd_ms"] = median_ms(encode_step, device)
        if backend == "native":

            def jacobian_step(enc=enc):
                x = x0.clone().requires_grad_(True)
                table = enc.table.detach().clone().requires_grad_(True)
                y, jac = native.hashgrid_encode_with_jacobian(x, table, enc.layout, False)
                (y.square().sum() + jac.square().sum()).backward()

            out["native_jacobian_fwd_bwd_ms"] = median_ms(jacobian_step, device)
    image = torch.rand(80, 192, 192, generator=g).to(device)
    pts0 = (torch.rand(n, 3, generator=g) * torch.tensor([79.0, 191.0, 191.0])).to(device)

    def warp_step():
        p = pts0.clone().requires_grad_(True)
        native.warp(image, p).sum().backward()

    out["native_warp_fwd_bwd_ms"] = median_ms(warp_step, device)
    out["points"] = n
    return out


def register(device: str, backend: str, shape, steps: int | None) -> dict:
    from neuralreg import RegistrationConfig, register_pair
    from neuralreg.metrics import dice
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=tuple(shape))
    kw = {"steps": steps} if steps else {}
    cfg = RegistrationConfig(device=device, progress=False, **kw)
    cfg.field.backend = backend
    _sync(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = register_pair(pair["moving"], pair["fixed"], cfg)
    _sync(device)
    seconds = time.perf_counter() - t0
    warped = reg.warp(pair["moving_labels"], mode="nearest")
    return {
        "shape": list(shape),
        "steps": cfg.steps,
        "seconds": seconds,
        "seconds_per_step": reg.info["seconds_per_step"],
        "backend": reg.info["backend"],
        "bone_dice": dice(warped.data, pair["fixed_labels"].data, [1, 3])["mean"],
        "quality": reg.info["quality"]["verdict"],
        "peak_gpu_memory_mb": torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None,
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("gpu.json"), help="JSON written (default: gpu.json)")
    p.add_argument("--shape", type=int, nargs=3, default=(80, 192, 192), help="registration grid (default: 80 192 192)")
    p.add_argument("--points", type=int, default=65536, help="points per kernel timing (default: 65536)")
    p.add_argument("--smoke", action="store_true", help="CPU, emulated CUDA kernels, small pair: checks the script")
    args = p.parse_args(argv)

    from neuralreg import backends
    from neuralreg.fields import native

    report: dict = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cuda_available": torch.cuda.is_available(),
        "failed_steps": [],
    }
    if args.smoke:
        device, selection, shape, steps, n = "cpu", "emulated", (24, 32, 32), 30, 2048
    else:
        if not torch.cuda.is_available():
            args.out.write_text(json.dumps({**report, "error": "no CUDA GPU visible to torch"}, indent=2))
            print("gpu_check: no CUDA GPU visible to torch (install a CUDA build of torch)", file=sys.stderr)
            return 2
        device, selection, shape, steps, n = "cuda", "cuda", tuple(args.shape), None, args.points
        report["gpu"] = torch.cuda.get_device_name(0)

    def step(name, fn):
        print(f"gpu_check: {name}...", file=sys.stderr, flush=True)
        try:
            report[name] = fn()
        except Exception as exc:  # keep going; the JSON says what failed
            report[name] = {
                "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                "traceback": traceback.format_exc(),
            }
            report["failed_steps"].append(name)

    t0 = time.perf_counter()
    kind = "emulated" if args.smoke else "cuda"
    step("build", lambda: {"status": native.status(kind), "seconds": time.perf_counter() - t0})
    report["backends"] = backends()
    step("tests", lambda: run_tests(selection))
    if isinstance(report.get("tests"), dict) and report["tests"].get("exit_code", 0) != 0:
        report["failed_steps"].append("tests")
    names = ["native"] + (["tcnn"] if backends().get("tcnn", "").startswith("available") and not args.smoke else [])

    def kernels():
        if args.smoke:
            with native.emulate_cuda():
                return time_kernels(device, n, ["native"])
        return time_kernels(device, n, names)

    step("kernels", kernels)
    for backend in names:
        step(f"register_{backend}", lambda b=backend: register(device, b, shape, steps))
    args.out.write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: wrote {args.out}; failed steps: {report['failed_steps'] or 'none'}", file=sys.stderr)
    return 1 if report["failed_steps"] else 0


if __name__ == "__main__":
    sys.exit(main())
