"""`python -m raymeta ...`: the same command line as `raymeta ...`."""

import sys

from raymeta.cli import main

sys.exit(main())
