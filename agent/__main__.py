"""``python -m agent`` is ``backup-agent``."""

import sys

from agent.cli.main import main

sys.exit(main())
