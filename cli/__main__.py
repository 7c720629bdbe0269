"""`python -m cli COMMAND` (see cli/__init__.py)."""

import sys

from cli import main

sys.exit(main())
