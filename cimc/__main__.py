"""`python -m cimc`: the same command line as the `cimc` script."""

import sys

from cimc.cli import main

sys.exit(main())
