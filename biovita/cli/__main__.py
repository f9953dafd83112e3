import sys

from biovita.cli import main

sys.exit(main())
