"""The fields' guards: the watchdog flags a jump, and the run rolls back."""

import warnings

import numpy as np
import torch
from knee_poses import CONFIG

from neuralreg import RegistrationConfig, RegistrationWarning


def test_watchdog_flags_a_jump_not_noise():
    from neuralreg.optim.watchdog import Watchdog

    rng = np.random.default_rng(0)
    calm = Watchdog(0.25, relative=False)
    assert not any(calm.update(0.4 + 0.03 * rng.standard_normal(), 0.4) for _ in range(300))
    jump = Watchdog(0.25, relative=False)
    series = [0.42] * 5 + [0.47, 0.73, 0.92, 0.99, 0.98, 0.96]  # the real knee pair's sim_ba
    fired = [jump.update(0.4, v) for v in series]
    assert fired.index(True) == 8 and jump.healthy()  # fired, then the window restarts
    mse = Watchdog(0.5, relative=True)  # relative to its best: 1e-3 -> 1.6e-3 is a jump, +0.2 of nothing
    assert [mse.update(v) for v in [1e-3] * 5 + [1.6e-3] * 5].index(True) == 9


def test_a_field_that_jumps_away_is_rolled_back(phantom):
    """A constant 30 % shift of Phi_BA injected mid-run (GradICON cannot see it): rolled back, maps consistent."""
    from neuralreg.optim.adam import Adam
    from neuralreg.optim.registration import PairRegistration

    def run(tolerance):
        calls = {"n": 0}

        class Kicked(Adam):  # the run's optimizer, with a kick at the fields' 100th step
            def step(self):
                super().step()
                if len(self.params) > 2:  # the fields' optimizer, not the affine one
                    calls["n"] += 1
                    if calls["n"] == 100:
                        with torch.no_grad():
                            self.params[-1].add_(0.3)  # last bias of Phi_BA: a constant displacement

        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RegistrationWarning)
            cfg = RegistrationConfig(**{**CONFIG, "divergence_tolerance": tolerance, "affine_init": "centroid"})
            return PairRegistration(phantom["moving"], phantom["fixed"], cfg, optimizer=Kicked).run()

    guarded, unguarded = run(0.25), run(0.0)
    assert guarded.info["rollbacks"] >= 1 and unguarded.info["rollbacks"] == 0
    assert guarded.info["quality"]["verdict"] == "good"
    assert unguarded.info["quality"]["verdict"] == "failed"  # the self-check sees what the watchdog prevents
    assert guarded.inverse_consistency_error() < 2.0 < unguarded.inverse_consistency_error()
