"""Container entry for the judge stage: `python -m jobs.judge <cmv judge arguments>`."""

import sys

from cmv_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["judge", *sys.argv[1:]]))
