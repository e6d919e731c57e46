"""``python -m agent`` is ``backup-agent``."""

import sys

from agent.cli import main

sys.exit(main())
