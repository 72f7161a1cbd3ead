"""`python -m launcher.estimate`: predicted GPU memory per rank (launcher/memory/estimate_cli.py)."""

import sys

from launcher.memory.estimate_cli import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
