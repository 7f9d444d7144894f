"""`python -m fastfpm`: the command line (see fastfpm/cli.py)."""

import sys

from fastfpm.cli import main

sys.exit(main())
