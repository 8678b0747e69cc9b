"""Container entry for the train stage: `python -m jobs.train <cmv train arguments>`."""

import sys

from cmv_core.cli import main

if __name__ == "__main__":
    sys.exit(main(["train", *sys.argv[1:]]))
