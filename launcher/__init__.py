"""launcher: a distributed PyTorch training launcher (Hydra + torchrun/Slurm, DDP and pipelines)."""

__version__ = "0.1.0"
