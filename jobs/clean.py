"""Container entry for the clean stage: `python -m jobs.clean <cmv clean arguments>`."""

import sys

from cmv_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["clean", *sys.argv[1:]]))
