"""`python -m launcher.generate`: batched inference from a file (launcher/after/generate.py)."""

import sys

from launcher.after.generate import main

if __name__ == "__main__":
    sys.exit(main())
