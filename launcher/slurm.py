"""`python -m launcher.slurm` (and `launcher-slurm`): submit, status, cancel (launcher/launch/slurm.py)."""

import sys

from launcher.launch.slurm import main

if __name__ == "__main__":
    sys.exit(main())
