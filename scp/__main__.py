"""``python -m scp`` runs the command line."""

import sys

from scp.cli import main

sys.exit(main())
