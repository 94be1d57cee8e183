"""A field step runs without waiting for the device: no value or shape read back to the host.

Counted on the CPU with a ``TorchDispatchMode`` that sees every aten operation: those that
synchronise a GPU with the host (``_local_scalar_dense`` behind ``.item()``/``bool()``,
``nonzero``, data-dependent shapes) are counted inside ``PairRegistration.field_step``.
"""

import warnings

import pytest

from neuralreg import PairRegistration, RegistrationConfig
from neuralreg.phantoms import knee_phantom_pair
from neuralreg.testing import OpCounter


class _Counted(PairRegistration):
    """Counts the operations of every field step after the first ``skip``."""

    def __init__(self, *args, skip: int = 5, **kwargs):
        super().__init__(*args, **kwargs)
        self.counter, self.skip, self.counted = OpCounter(), skip, 0

    def field_step(self, stage, s, i, n_steps):
        if i < self.skip:
            return super().field_step(stage, s, i, n_steps)
        self.counted += 1
        with self.counter:
            return super().field_step(stage, s, i, n_steps)


@pytest.mark.parametrize("check_every, syncs_per_step", [(10, 0), (1, 1)])
def test_a_field_step_does_not_wait_for_the_device(check_every, syncs_per_step):
    """With the GPU's schedule (the loss read every 10 steps) a step reads nothing back; read
    every step (the CPU's), it reads one value: whether the loss is finite."""
    pair = knee_phantom_pair(0, shape=(24, 32, 32))
    cfg = RegistrationConfig(steps=25, affine_steps=0, pyramid=(2, 1), stage_fractions=(0.4, 0.6), points=2048)
    run = _Counted(pair["moving"], pair["fixed"], cfg, run={"check_every": check_every, "progress": False})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 25 steps: the self-check's verdict is not the point here
        run.run()
    assert run.counted == 15  # steps 5.. of both stages
    assert sum(run.counter.ops.values()) > 100 * run.counted  # every operation of a step was seen
    assert sum(run.counter.syncs().values()) == syncs_per_step * run.counted, run.counter.syncs()


@pytest.mark.parametrize("similarity, most", [("lncc", 280), ("mi", 260)])
def test_a_field_step_issues_few_operations(similarity, most):
    """Each operation is a launch on a GPU, where the step is bound by the host: a step
    of the default stages (local NCC first, mutual information after) stays near what
    ``benchmarks/step_ops.py`` measured (267 and 247 operations; 812 on 2026-12-04). The
    three map passes are one node each (``fields.fused``: the op-by-op path gave 400) and
    mutual information one kernel each way (it was 338 without)."""
    pair = knee_phantom_pair(0, shape=(24, 32, 32))
    cfg = RegistrationConfig(
        steps=21, affine_steps=0, pyramid=(1,), stage_fractions=(1.0,), points=2048, similarity=similarity
    )
    run = _Counted(pair["moving"], pair["fixed"], cfg, run={"check_every": 10, "progress": False}, skip=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.run()
    assert run.counted == 16  # two draws of the points (8 steps each) among them
    per_step = sum(run.counter.ops.values()) / run.counted
    assert 150 < per_step <= most, per_step
