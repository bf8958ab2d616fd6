"""``python -m dedn``: the same command line as ``dedn``."""

import sys

from dedn.cli import main

if __name__ == "__main__":
    sys.exit(main())
