"""``python -m turbo_core.cli`` = the ``turbo`` command."""

import sys

from turbo_core.cli import main

sys.exit(main())
