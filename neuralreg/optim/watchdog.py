"""Guards of the fields' fit: ``Watchdog`` (a similarity that jumps away from its best) and
``Snapshot`` (the state a fit rolls back to)."""

from __future__ import annotations

import copy

import numpy as np


class Watchdog:
    """Catches a run that jumps away from a good state without producing NaN.

    Within one pyramid stage it tracks the ``window``-step running mean of each similarity
    term and its best (lowest) value; a term whose running mean rises more than
    ``tolerance`` above its best has diverged (in units of 1 - NCC; for ``losses.DATA_SCALED`` relative
    to its best). Seen on real-geometry knee pairs: one field jumped within 3 steps of a
    stage start to a 40 mm offset outside the other image, where the similarity has no
    gradient and GradICON (blind to a constant shift of the composition) cannot pull it back.
    """

    def __init__(self, tolerance: float, relative: bool, window: int = 5):
        self.tolerance, self.relative, self.window = tolerance, relative, window
        self.reset()

    def reset(self) -> None:
        """Start a new stage (the similarity's scale changes with the resolution)."""
        self.recent: list[tuple[float, ...]] = []
        self.best: tuple[float, ...] | None = None

    def _running(self) -> tuple[float, ...]:
        return tuple(float(np.mean(v)) for v in zip(*self.recent, strict=True))

    def _over(self, tolerance: float) -> bool:
        limits = [b * (1 + tolerance) if self.relative else b + tolerance for b in self.best]
        return any(r > lim for r, lim in zip(self._running(), limits, strict=True))

    def update(self, *terms: float) -> bool:
        """Record one step's terms; True when a term has diverged (then the window restarts)."""
        self.recent = (self.recent + [terms])[-self.window :]
        if len(self.recent) < self.window or self.tolerance <= 0:
            return False
        running = self._running()
        self.best = running if self.best is None else tuple(map(min, self.best, running))
        if self._over(self.tolerance):
            self.recent = []
            return True
        return False

    def healthy(self) -> bool:
        """Whether the latest running means are within half the tolerance of the best (safe to snapshot)."""
        return self.best is None or len(self.recent) < self.window or not self._over(self.tolerance / 2)


class Snapshot:
    """A deep copy of the fields' and the optimizer's state (``state_dict``s), to restore later."""

    def __init__(self, phi_ab, phi_ba, optimizer):
        self.state = copy.deepcopy((phi_ab.state_dict(), phi_ba.state_dict(), optimizer.state_dict()))

    def restore(self, phi_ab, phi_ba, optimizer) -> None:
        """Load the copied state into the fields and the optimizer (the snapshot stays usable)."""
        a, b, o = copy.deepcopy(self.state)
        phi_ab.load_state_dict(a)
        phi_ba.load_state_dict(b)
        optimizer.load_state_dict(o)
