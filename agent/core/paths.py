"""Paths the agent knows before it reads any configuration (cheap to import)."""

from __future__ import annotations

from pathlib import Path
from typing import Final

DEFAULT_CONFIG_PATH: Final = Path("/etc/libvirt-backup-agent/agent.toml")
