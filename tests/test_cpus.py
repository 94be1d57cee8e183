"""The CPUs a process may use: affinity and cgroup quota (``neuralreg.cpus``)."""

import os

import pytest

from neuralreg.cpus import available_cpus, cgroup_quota, shares_cpus_by_default


def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "cpu.max"
    v1 = (tmp_path / "quota", tmp_path / "period")
    v2.write_text("150000 100000\n")
    assert cgroup_quota(v2, v1) == 2  # 1.5 CPUs: rounded up
    v2.write_text("max 100000\n")
    assert cgroup_quota(v2, v1) is None
    v2.unlink()
    v1[0].write_text("50000\n")
    v1[1].write_text("100000\n")
    assert cgroup_quota(v2, v1) == 1
    v1[0].write_text("-1\n")
    assert cgroup_quota(v2, v1) is None


def test_available_cpus_follows_the_affinity_mask():
    if not hasattr(os, "sched_setaffinity"):
        pytest.skip("no CPU affinity on this platform")
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert available_cpus() == 1
    finally:
        os.sched_setaffinity(0, before)
    assert 1 <= available_cpus() <= len(before)


def test_runs_share_their_cpus_unless_the_environment_says_0(monkeypatch):
    from neuralreg.config import RunConfig

    monkeypatch.delenv("NEURALREG_SHARE_CPUS", raising=False)
    assert shares_cpus_by_default() and RunConfig().share_cpus
    monkeypatch.setenv("NEURALREG_SHARE_CPUS", "0")
    assert not shares_cpus_by_default() and not RunConfig().share_cpus
    assert RunConfig(share_cpus=True).share_cpus
