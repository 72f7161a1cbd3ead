"""Where a run's processes come from, where they write, and how they end.

run.py        `python -m launcher.run`: torchrun's launch API, exiting with the launcher's exit code
slurm.py      `python -m launcher.slurm`: submit (renders slurm/train.sbatch), status, cancel
dist.py       who this process is (torchrun's or Slurm's environment); the process group; collectives
rundir.py     the run directory: one path, the same on every rank, chosen before anything is written
diskspace.py  free-space warnings; a full disk named clearly (exit 6)
exits.py      exit codes; a rank's bounded exit
"""
