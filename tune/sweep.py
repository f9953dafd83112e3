"""Ray Tune sweep: `python tune/sweep.py [--space NAME_OR_FILE] [key=value ...]` (the default space: biovita/configs/sweeps/default.yaml)."""

import sys

from biovita.train.sweep import main

if __name__ == "__main__":
    sys.exit(main())
