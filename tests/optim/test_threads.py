"""The run's threads: fewer while other processes keep its CPUs busy (``optim.threads``)."""

import warnings

import pytest
import torch

from neuralreg.optim import threads
from neuralreg.optim.threads import CpuShare, busy_cpu_seconds, run_threads


class _Machine:
    """A clock, the CPUs' busy seconds and this process's CPU seconds, moved by hand."""

    def __init__(self):
        self.t = self.busy = self.own = 0.0
        self.counts = []

    def run(self, seconds: float, own_cpus: float, other_cpus: float) -> None:
        self.t += seconds
        self.own += own_cpus * seconds
        self.busy += (own_cpus + other_cpus) * seconds

    def share(self, threads: int, cpus: int) -> CpuShare:
        return CpuShare(
            threads,
            cpus=set(range(cpus)),
            interval=0.5,
            busy=lambda: self.busy,
            own=lambda: self.own,
            clock=lambda: self.t,
            set_threads=self.counts.append,
        )


def test_a_busy_process_beside_the_run_takes_a_thread_and_gives_it_back_when_it_ends():
    m = _Machine()
    share = m.share(2, cpus=2)
    m.run(0.3, own_cpus=2, other_cpus=1)
    share.poll()  # before the interval: nothing read
    assert share.threads == 2 and m.counts == []
    m.run(0.3, own_cpus=2, other_cpus=1)
    share.poll()
    assert share.threads == 1 and m.counts == [1]
    assert share.changes == [{"seconds": 0.6, "threads": 1, "others": 1.0}]
    m.run(1.0, own_cpus=1, other_cpus=0.3)  # still some other work: no flapping back
    share.poll()
    assert share.threads == 1
    m.run(1.0, own_cpus=1, other_cpus=0.05)
    share.poll()
    assert share.threads == 2 and m.counts == [1, 2]
    m.run(1.0, own_cpus=2, other_cpus=0.4)  # under the line that takes a thread
    share.poll()
    assert share.threads == 2 and len(share.changes) == 2


@pytest.mark.parametrize(
    ("most", "cpus", "others", "wanted"),
    [
        (2, 2, 0.0, 2),
        (2, 2, 0.45, 2),
        (2, 2, 0.55, 1),
        (2, 2, 3.0, 1),  # at least one
        (2, 8, 5.9, 2),  # CPUs left for every thread of the run
        (2, 8, 6.6, 1),
        (4, 8, 5.5, 2),
    ],
)
def test_the_count_is_the_cpus_left_at_least_one_at_most_the_runs(most, cpus, others, wanted):
    assert _Machine().share(most, cpus).wanted(others) == wanted


def test_no_reading_of_the_load_keeps_the_count():
    m = _Machine()
    share = CpuShare(
        2, cpus={0, 1}, busy=lambda: None, own=lambda: m.own, clock=lambda: m.t, set_threads=m.counts.append
    )
    m.run(5.0, own_cpus=2, other_cpus=1)
    share.poll()
    assert share.threads == 2 and m.counts == []


def test_busy_seconds_are_read_from_proc_stat_for_the_cpus_given(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 10 100 9000 50 5 5 20 0 0\n"
        "cpu0 100 0 50 4500 25 0 0 10 0 0\n"
        "cpu1 200 10 50 4500 25 5 5 10 0 0\n"
        "intr 12345\n"
    )
    hz = __import__("os").sysconf("SC_CLK_TCK")
    assert busy_cpu_seconds(None, str(stat)) == pytest.approx(440 / hz)  # all but idle and iowait
    assert busy_cpu_seconds({1}, str(stat)) == pytest.approx(280 / hz)
    assert busy_cpu_seconds(None, str(tmp_path / "missing")) is None
    stat.write_text("cpu  300 10 100 9000 50 5 5 20 0 0\ncpuX 1 2 3 4 5 6 7 8\n")
    assert busy_cpu_seconds({0}, str(stat)) is None  # a format it does not know: no reading


def test_run_threads_restores_the_callers_count_and_shares_only_several_threads():
    callers = torch.get_num_threads()
    with run_threads(callers + 1, share=True) as share:
        assert torch.get_num_threads() == callers + 1 and share.most == callers + 1
    assert torch.get_num_threads() == callers
    with run_threads(1, share=True) as share:
        assert share is None  # one thread never waits for another
    with run_threads(2, share=False) as share:
        assert share is None
    assert torch.get_num_threads() == callers


def test_a_registration_beside_a_busy_process_runs_on_fewer_threads_and_says_so(monkeypatch):
    """The whole run polls its share: with one CPU's worth of other work on every reading it
    drops to one thread, records it in ``info["threads"]``, registers as well, and leaves the
    caller's count as it was."""
    from neuralreg import RegistrationConfig, register_pair
    from neuralreg.phantoms import knee_phantom_pair

    # a reading at every poll, and the CPUs busy with one CPU's worth of other work besides
    # this process's own, whatever the run's speed
    monkeypatch.setattr(threads, "POLL_SECONDS", 0.0)
    own, clock = threads.own_cpu_seconds, threads.time.monotonic
    monkeypatch.setattr(threads, "busy_cpu_seconds", lambda cpus: own() + clock())
    pair = knee_phantom_pair(0, shape=(24, 48, 48))
    cfg = RegistrationConfig(steps=40, affine_steps=10, seed=0)
    callers = torch.get_num_threads()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shared = register_pair(
            pair["moving"], pair["fixed"], cfg, run={"progress": False, "threads": 2, "share_cpus": True}
        )
        fixed = register_pair(
            pair["moving"], pair["fixed"], cfg, run={"progress": False, "threads": 2, "share_cpus": False}
        )
    assert torch.get_num_threads() == callers
    changes = shared.info["threads"]["changes"]
    assert shared.info["threads"]["count"] == 2 and [c["threads"] for c in changes] == [1]
    assert fixed.info["threads"] == {"count": 2, "changes": []}
    # the same optimisation on another thread count: the same result to rounding
    a, b = (r.displacement_on_grid() for r in (shared, fixed))
    a, b = (x[0] if isinstance(x, tuple) else x for x in (a, b))
    assert float((a - b).abs().max()) < 0.05


def test_a_run_stops_polling_its_share_when_it_ends():
    """After ``run`` the registration and its pair hold no share: a phase called again
    (``fit_fields``) leaves the caller's thread count as it is."""
    from neuralreg import RegistrationConfig
    from neuralreg.optim.registration import PairRegistration
    from neuralreg.phantoms import knee_phantom_pair

    pair = knee_phantom_pair(0, shape=(16, 32, 32))
    run = PairRegistration(
        pair["moving"],
        pair["fixed"],
        RegistrationConfig(steps=6, affine_steps=4),
        run={"progress": False, "threads": 2, "share_cpus": True},
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run.run()
    assert run.cpu_share is None and run.pair.cpu_share is None
