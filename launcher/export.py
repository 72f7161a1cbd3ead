"""`python -m launcher.export`: prune, quantize and measure a trained model (launcher/after/export.py)."""

import sys

from launcher.after.export import main

if __name__ == "__main__":
    sys.exit(main())
