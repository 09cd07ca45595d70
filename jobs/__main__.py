"""``python -m jobs`` is the ``icm`` command (jobs/cli.py)."""

import sys

from jobs.cli import main

sys.exit(main())
