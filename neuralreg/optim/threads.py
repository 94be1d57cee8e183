"""A run's CPU threads: its count for the run, the caller's restored after
(``run_threads``), and fewer while other processes keep this process's CPUs busy
(``CpuShare``).

OpenMP's threads spin for a while when they wait for each other (libgomp's default). Alone
on its CPUs that is what makes a second thread pay on a small image: an IXI brain pair
(120x120x90, 2 threads, whole registration) took 15-16 s with the default spin and 25-28 s
with a spin of 500 rounds, as long as with one thread. Beside a busy process it is a
collapse: a thread that spins holds the core that its descheduled partner needs (the knee
phantom, 2 threads, beside one busy single-threaded process: 5.8x its time alone with a
spin of 30,000 rounds, 2.4x with 5,000). ``CpuShare`` keeps the spin and takes threads away
instead: polled between steps, every ``interval`` seconds it reads the CPU time that the
process's CPUs spent on other work (``/proc/stat`` less this process's own, ``os.times``)
and runs on as many threads as CPUs are left, at least one and at most the run's; a thread
without partners never waits for one. docs/benchmarks.md has the measurements.

The result of a run depends on its thread count by rounding (sums split across threads), so
a run that shares its CPUs can end a few thousandths of a millimetre away from one that did
not; ``RunConfig.share_cpus=False`` (or ``NEURALREG_SHARE_CPUS=0``) keeps the count fixed.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections.abc import Callable, Iterator

import torch

from neuralreg.cpus import process_cpus

PROC_STAT = "/proc/stat"
DROP_AT = 0.5  # other work of this many CPUs (and one more per further thread) takes a thread away
RESTORE_BELOW = 0.25  # ... and other work under this many CPUs gives it back
POLL_SECONDS = 0.5  # between two readings of the load: /proc/stat's ticks are 10 ms


def busy_cpu_seconds(cpus: set[int] | None = None, path: str = PROC_STAT) -> float | None:
    """Seconds the CPUs ``cpus`` (None: all) have spent busy since boot (user, nice, system,
    irq, softirq, steal: everything but idle and iowait), from ``/proc/stat``; None where
    there is no such file (not Linux)."""
    try:
        with open(path) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    ticks = 0
    try:
        for line in lines:
            name, *fields = line.split() or [""]
            if not name.startswith("cpu") or len(fields) < 8:
                continue
            if (name != "cpu") if cpus is None else (name == "cpu" or int(name[3:]) not in cpus):
                continue
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in fields[:8])
            ticks += user + nice + system + irq + softirq + steal
        return ticks / os.sysconf("SC_CLK_TCK")
    except (ValueError, OSError):  # a format this does not know: no reading
        return None


def own_cpu_seconds() -> float:
    """CPU seconds of this process so far, all its threads."""
    t = os.times()
    return t.user + t.system


class CpuShare:
    """The run's thread count while other processes use its CPUs: ``poll()`` between steps.

    Args:
        threads: the run's thread count, the most it uses.
        cpus: the CPUs this process may run on (None: its affinity mask).
        interval: seconds between two readings of the CPUs' load (None: ``POLL_SECONDS``).
        busy: () -> busy seconds of ``cpus`` so far (None: unreadable); default
            ``busy_cpu_seconds``. own: () -> this process's CPU seconds; default
            ``own_cpu_seconds``. clock: () -> seconds; default ``time.monotonic``.
        set_threads: n -> None; default ``torch.set_num_threads`` (called on the thread
            that polls: OpenMP's count belongs to the calling thread).

    Attributes:
        threads: the count in use now.
        changes: one dict per change: seconds since the start, the new count, and the
            other work seen (in CPUs).
    """

    def __init__(
        self,
        threads: int,
        cpus: set[int] | None = None,
        interval: float | None = None,
        busy: Callable[[], float | None] | None = None,
        own: Callable[[], float] = own_cpu_seconds,
        clock: Callable[[], float] = time.monotonic,
        set_threads: Callable[[int], None] = torch.set_num_threads,
    ):
        if cpus is None:
            cpus = process_cpus()
        self.most = self.threads = threads
        self.n_cpus = len(cpus) if cpus else (os.cpu_count() or 1)
        self.interval = POLL_SECONDS if interval is None else interval
        self._busy = busy if busy is not None else (lambda: busy_cpu_seconds(cpus))
        self._own, self._clock, self._set = own, clock, set_threads
        self.changes: list[dict] = []
        self._start = clock()
        self._last = self._read()

    def _read(self) -> tuple[float, float | None, float]:
        return self._clock(), self._busy(), self._own()

    def poll(self) -> None:
        """Read the load when ``interval`` has passed since the last reading, and change the
        thread count where the other work calls for it."""
        now = self._clock()
        if now - self._last[0] < self.interval or self._last[1] is None:
            return
        reading = self._read()
        (t0, busy0, own0), (t1, busy1, own1) = self._last, reading
        self._last = reading
        if busy1 is None or t1 <= t0:
            return
        others = max(0.0, ((busy1 - busy0) - (own1 - own0)) / (t1 - t0))
        wanted = self.wanted(others)
        if wanted != self.threads:
            self._set(wanted)
            self.threads = wanted
            self.changes.append({"seconds": round(t1 - self._start, 2), "threads": wanted, "others": round(others, 2)})

    def wanted(self, others: float) -> int:
        """The thread count for other work of ``others`` CPUs: the CPUs left, at least one
        and at most the run's; a thread goes at ``DROP_AT`` CPUs of other work and comes
        back under ``RESTORE_BELOW`` (no flapping between the two)."""
        margin = 1 - (DROP_AT if self.threads == self.most else RESTORE_BELOW)
        free = self.n_cpus - math.floor(others + margin)
        return max(1, min(self.most, free))


@contextlib.contextmanager
def run_threads(threads: int | None, share: bool = False) -> Iterator[CpuShare | None]:
    """The run's CPU thread count (``RunConfig.threads``; None: the caller's), and with
    ``share`` (and more than one thread) a ``CpuShare`` to poll; the caller's count is
    restored afterwards: a library call leaves the process as it found it. (Every random
    number of a run comes from generators of its own, seeded by ``RegistrationConfig.seed``.)"""
    callers = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    count = torch.get_num_threads()
    try:
        yield CpuShare(count) if share and count > 1 else None
    finally:
        torch.set_num_threads(callers)
