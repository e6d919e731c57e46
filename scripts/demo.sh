#!/usr/bin/env bash
# A first look: sets the host up, then runs demo/run.py (a throwaway domain, the agent,
# a full and an incremental backup through the HTTP API, restore, verify, clean-up).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/host-setup.sh
exec .venv/bin/python -m demo.run "$@"
