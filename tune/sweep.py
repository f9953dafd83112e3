"""Ray Tune sweep: `python tune/sweep.py [--space tune/spaces/default.yaml] [key=value ...]`."""

import sys

from biovita.train.sweep import main

if __name__ == "__main__":
    sys.exit(main())
