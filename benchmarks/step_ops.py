"""Operations and host synchronisations per step of the fields' stage, counted on any device.

A GPU step built of hundreds of small kernels is bound by the host (Python and launches),
and a step that reads a value back (``.item()``, ``nonzero``, a data-dependent shape) waits
for the GPU. This counts both without a GPU: two registrations of one generated pair that
differ only in their number of field steps run under a ``TorchDispatchMode`` that counts
every aten operation and those that synchronise with the host; the difference divided by
the difference in steps is the count per step, the fixed costs (set-up, outputs) cancelled.

    python benchmarks/step_ops.py [--device cpu|cuda] [--similarity lncc|mi] [--json ops.json] [--profile 30]

``--profile N`` adds a ``torch.profiler`` table of N steps (self time, top operations).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from neuralreg.testing import OpCounter


def _register(steps: int, device: str, shape=(24, 48, 48), similarity: str = "lncc"):
    from neuralreg import RegistrationConfig, register_pair
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=shape)
    cfg = RegistrationConfig(
        steps=steps, affine_steps=0, pyramid=(1,), stage_fractions=(1.0,), seed=0, similarity=similarity
    )
    counter = OpCounter()
    import warnings

    with warnings.catch_warnings(), counter:
        warnings.simplefilter("ignore")
        # the loss read every 10 steps, as on a GPU by default: the count is the same on every device
        register_pair(pair["moving"], pair["fixed"], cfg, run={"device": device, "progress": False, "check_every": 10})
    return counter


def per_step(device: str = "cpu", steps=(20, 40), similarity: str = "lncc") -> dict:
    """Aten operations and host synchronisations per field step (one pyramid stage, no affine
    part) with ``similarity`` (the default run's first stage is "lncc", its later ones "mi")."""
    a, b = (_register(n, device, similarity=similarity) for n in steps)
    span = steps[1] - steps[0]
    ops = {k: (b.ops[k] - a.ops[k]) / span for k in b.ops if b.ops[k] != a.ops[k]}
    syncs = {k: (b.syncs().get(k, 0) - a.syncs().get(k, 0)) / span for k in b.syncs()}
    return {
        "device": device,
        "similarity": similarity,
        "ops_per_step": sum(ops.values()),
        "syncs_per_step": sum(syncs.values()),
        "syncs_by_op": {k: v for k, v in syncs.items() if v},
        "top_ops": dict(sorted(ops.items(), key=lambda kv: -kv[1])[:25]),
    }


def profile_table(device: str = "cpu", steps: int = 30, rows: int = 30) -> str:
    """``torch.profiler``'s table (self time) over a registration of ``steps`` field steps."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    _register(5, device)  # warm-up: kernels built, caches filled
    with profile(activities=activities) as prof:
        _register(steps, device)
    key = "self_cuda_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--similarity", default="lncc", help="the fields' similarity (default: lncc; the later stages': mi)")
    p.add_argument("--json", type=Path, help="write the counts here")
    p.add_argument("--profile", type=int, default=0, help="also print a torch.profiler table of this many steps")
    args = p.parse_args(argv)
    counts = per_step(args.device, similarity=args.similarity)
    print(json.dumps({k: v for k, v in counts.items() if k != "top_ops"}, indent=1))
    for name, n in counts["top_ops"].items():
        print(f"  {n:8.1f}  {name}")
    if args.json:
        args.json.write_text(json.dumps(counts, indent=1))
    if args.profile:
        print(profile_table(args.device, args.profile), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
