"""`python -m launcher.serve`: batched inference over HTTP (launcher/after/serve/)."""

import sys

from launcher.after.serve.cli import main

if __name__ == "__main__":
    sys.exit(main())
