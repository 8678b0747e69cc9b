"""Container entry for the generate stage: `python -m jobs.generate <cmv generate arguments>`."""

import sys

from cmv_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["generate", *sys.argv[1:]]))
