"""`python -m launcher.report`: plots and a summary of run directories (launcher/observe/report.py)."""

import sys

from launcher.observe.report import main

if __name__ == "__main__":
    sys.exit(main())
