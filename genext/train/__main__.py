"""``python -m genext.train <task> [options]``: the same command as ``genext train``."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main(prog="python -m genext.train"))
