"""A real Slurm cluster for this directory's tests, started once per session and stopped by pid."""

from __future__ import annotations

import pytest

from tests.slurm.cluster import SlurmCluster, install_reason


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    reason = install_reason()
    if reason:
        pytest.skip(f"no Slurm cluster: {reason}")
    cluster = SlurmCluster(tmp_path_factory.mktemp("slurm"))
    cluster.start()
    yield cluster
    cluster.stop()
