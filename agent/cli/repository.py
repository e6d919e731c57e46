"""``backup-agent repository init [PATH]``: make a path this agent's repository, explicitly.

The first backup does this by itself on an empty or missing path; ``init`` is for a
new host on shared storage (adopt the repository another host made), for a repository
made before markers existed, and for starting over on a new path (``--replace``). The
rules are :mod:`agent.repository.marker`'s; a refusal writes nothing and exits 1.
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path

from agent.core.config import AgentConfig
from agent.repository.marker import Action, Outcome, RepositoryMarker

_SAID = {
    Action.INITIALISED: "initialised a new repository {id} at {path}; this agent uses it",
    Action.UPGRADED: "wrote marker {id} into the repository at {path} (made by an earlier "
    "agent version); this agent uses it",
    Action.ADOPTED: "adopted repository {id} at {path}; this agent uses it",
    Action.UNCHANGED: "{path} is repository {id}, which this agent uses already; nothing changed",
}


def init(config: AgentConfig, path: Path | None, replace: bool, as_json: bool) -> None:
    root = config.repository_path if path is None else path.absolute()
    marker = RepositoryMarker(root, config.agent.state_dir, timeout=config.repository.io_timeout)
    outcome = asyncio.run(marker.init(replace=replace))
    if as_json:
        print(json.dumps(_as_dict(outcome, marker), indent=2))
    else:
        line = _SAID[outcome.action].format(id=outcome.id, path=root)
        if outcome.previous is not None and outcome.previous != outcome.id:
            line += f" (instead of {outcome.previous})"
        print(line)
    if root != config.repository_path:
        print(
            f"note: the configuration's [repository] path is {config.repository_path}; set it "
            f"to {root} for this agent to back up there",
            file=sys.stderr,
        )


def _as_dict(outcome: Outcome, marker: RepositoryMarker) -> dict[str, str | None]:
    return {
        "action": str(outcome.action),
        "path": str(outcome.path),
        "id": outcome.id,
        "previous_id": outcome.previous,
        "id_file": str(marker.id_file),
    }
