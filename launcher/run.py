"""`python -m launcher.run`: torchrun with the launcher's exit code (launcher/launch/run.py)."""

import sys

from launcher.launch.run import main

if __name__ == "__main__":
    sys.exit(main())
