#!/usr/bin/env bash
# Sets the host up (scripts/host-setup.sh) and runs the agent in the foreground.
# Without arguments it uses /etc/libvirt-backup-agent/agent.toml if present, else the
# embedded defaults; any arguments are passed to `backup-agent run` (e.g. --config FILE).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/host-setup.sh
exec .venv/bin/backup-agent run "$@"
