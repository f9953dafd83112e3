"""Main job: `ray job submit -- python ray_jobs/train.py [--config FILE] [key=value ...]`."""

import sys

from biovita.train.job import main

if __name__ == "__main__":
    sys.exit(main())
