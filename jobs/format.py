"""Container entry for the format stage: `python -m jobs.format <cmv format arguments>`."""

import sys

from cmv_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["format", *sys.argv[1:]]))
