"""One command for the first machine with a GPU: build, test and time the CUDA path.

    python benchmarks/gpu_check.py --out gpu.json

1. builds the CUDA extension (``native.status("cuda")``, with its build time; a failed
   build is a failed step, its first compiler error and log path in the JSON);
2. runs the CUDA-parametrized kernel tests (``tests/fields/test_native.py`` and
   ``test_fused.py``, ``-k cuda``: values, first and second derivatives, Jacobian kernels,
   warp and the fused map pass against the float64 reference); no test run, or any
   failure, is a failed step;
3. times the kernels (medians): hash-grid forward+backward, encoding with Jacobian
   forward+backward, fused warp forward+backward, native and, where installed, tinycudann;
4. registers an 80x192x192 knee phantom pair on the GPU with the native backend and, where
   installed, tinycudann (whole ``register_pair`` call: wall seconds, seconds per step,
   bone Dice, quality verdict, peak GPU memory);
5. times the whole ``neuralreg register --device cuda`` command on the knee phantom and,
   with ``NEURALREG_DATA``, on one IXI brain pair (seconds, Dice, verdict, backend);
6. counts aten operations and host synchronisations per field step
   (``benchmarks/step_ops.py``) and keeps a ``torch.profiler`` table of 30 steps;
and writes every number to one JSON file, rewritten after every step (a time-out keeps what
ran). Exit status 1 if a step failed (the JSON says which), 2 if there is no GPU.

On a GPU machine without network, carry nibabel (and tqdm, if absent) as wheels: see the
README, "GPU and tinycudann".

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
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    cmd += [str(ROOT / "tests" / "fields" / name) for name in ("test_native.py", "test_fused.py")] + ["-k", selection]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr.strip()[-300:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|failed|skipped|error)", tail)}
    result = {"command": " ".join(cmd[2:]), "exit_code": proc.returncode, "summary": tail, **counts}
    if proc.returncode != 0 or not counts.get("passed"):
        raise RuntimeError(f"kernel tests: {tail} (exit status {proc.returncode})")
    return result


def build(kind: str) -> dict:
    """Build (or load) the ``kind`` extension; a failed build raises with the compiler's first error."""
    from neuralreg.fields import native

    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        status = native.status(kind)
    if not status.startswith("available"):
        raise RuntimeError(f"{kind} build: {status}")
    return {"status": status, "seconds": time.perf_counter() - t0}


def cli_register(fixed, moving, out: Path, device: str, extra=()) -> dict:
    """The whole ``neuralreg register`` command, timed from outside (start-up, load, outputs)."""
    cmd = [sys.executable, "-m", "neuralreg", "register", "--fixed", str(fixed), "--moving", str(moving)]
    cmd += ["--out", str(out), "--device", device, "--quiet", *map(str, extra)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"neuralreg register: exit {proc.returncode}: {proc.stderr.strip()[-300:]}")
    report = json.loads((out / "report.json").read_text())
    return {
        "command_seconds": seconds,
        "registration_seconds": report["timings"]["registration_seconds"],
        "backend": report["backend"],
        "dice_after": (report.get("dice_after") or {}).get("mean"),
        "quality": report["quality"]["verdict"],
        "stderr": proc.stderr.strip()[-500:],
    }


def cli_runs(device: str, shape, work: Path) -> dict:
    """``neuralreg register`` on the knee phantom, and on the first IXI pair with NEURALREG_DATA."""
    import os

    from neuralreg.io import write_image
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=tuple(shape))
    for key in ("fixed", "moving", "fixed_labels", "moving_labels"):
        write_image(pair[key], work / f"knee_{key}.nii.gz")
    labels = [
        "--fixed-labels",
        work / "knee_fixed_labels.nii.gz",
        "--moving-labels",
        work / "knee_moving_labels.nii.gz",
    ]
    out = {"knee_phantom": cli_register(work / "knee_fixed.nii.gz", work / "knee_moving.nii.gz", work / "knee_out",
                                        device, labels)}  # fmt: skip
    data = os.environ.get("NEURALREG_DATA")
    images = sorted((Path(data) / "ixi_brains" / "images").glob("*.nii.gz")) if data else []
    if len(images) >= 2:
        labels = [
            Path(data) / "ixi_brains" / "labels" / p.name.replace(".nii.gz", "_DLMUSE.nii.gz") for p in images[:2]
        ]
        extra = ["--fixed-labels", labels[0], "--moving-labels", labels[1]] if all(p.is_file() for p in labels) else []
        out["ixi_brain"] = cli_register(images[0], images[1], work / "brain_out", device, extra)
    return out


def op_counts(device: str) -> dict:
    """Aten operations and host synchronisations per field step, and a profiler table of 30 steps."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    import step_ops

    counts = step_ops.per_step(device)
    counts["profile_30_steps"] = step_ops.profile_table(device, 30)
    return counts


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
    cfg = RegistrationConfig(**kw)
    cfg.field.backend = backend
    _sync(device)
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reg = register_pair(pair["moving"], pair["fixed"], cfg, run={"device": device, "progress": False})
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
        t0 = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # keep going; the JSON says what failed
            report[name] = {
                "error": f"{type(exc).__name__}: {exc}".splitlines()[0],
                "traceback": traceback.format_exc(),
            }
            report["failed_steps"].append(name)
        if isinstance(report[name], dict):
            report[name]["step_seconds"] = time.perf_counter() - t0
        args.out.write_text(json.dumps(report, indent=2, default=str))  # after every step: a time-out keeps it

    kind = "emulated" if args.smoke else "cuda"
    step("build", lambda: build(kind))
    report["backends"] = backends()
    step("tests", lambda: run_tests(selection))
    names = ["native"] + (["tcnn"] if backends().get("tcnn", "").startswith("available") and not args.smoke else [])

    def kernels():
        if args.smoke:
            with native.emulate_cuda():
                return time_kernels(device, n, ["native"])
        return time_kernels(device, n, names)

    step("kernels", kernels)
    for backend in names:
        step(f"register_{backend}", lambda b=backend: register(device, b, shape, steps))
    import tempfile

    with tempfile.TemporaryDirectory() as work:
        cli_extra = shape if args.smoke else args.shape
        step("cli", lambda: cli_runs(device, cli_extra, Path(work)))
    step("ops_per_step", lambda: op_counts(device))
    print(f"gpu_check: wrote {args.out}; failed steps: {report['failed_steps'] or 'none'}", file=sys.stderr)
    return 1 if report["failed_steps"] else 0


if __name__ == "__main__":
    sys.exit(main())
