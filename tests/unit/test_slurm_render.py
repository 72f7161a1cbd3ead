"""The sbatch script submit renders: bad slurm.* values are refused before anything reaches sbatch."""

from __future__ import annotations

import pytest

from launcher.config.schema import SlurmConfig
from launcher.errors import ConfigError
from launcher.launch.slurm import check_slurm, procs_per_node


@pytest.mark.parametrize(
    "field,value,phrase",
    [
        ("job_name", "x\n#SBATCH --uid=0", "must be one line"),
        ("extra_sbatch", ["--exclusive", "--qos=a\nrm -rf /"], "must be one line"),
        ("env", {"NCCL DEBUG": "x"}, "not a valid environment variable name"),
        ("nodes", 0, "must be >= 1"),
        ("nproc_per_node", 0, "must be >= 1"),
    ],
)
def test_bad_slurm_values_are_refused(field, value, phrase):
    with pytest.raises(ConfigError, match=phrase):
        check_slurm(SlurmConfig(**{field: value}))


def test_processes_per_node_default_to_gpus_or_one():
    assert procs_per_node(SlurmConfig(gpus_per_node=8)) == 8
    assert procs_per_node(SlurmConfig(gpus_per_node=0)) == 1
    assert procs_per_node(SlurmConfig(gpus_per_node=8, nproc_per_node=4)) == 4
