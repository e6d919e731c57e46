"""The agent's foundation, used by every other layer and importing none of them.

``config``     the configuration: TOML, pydantic models, defaults, JSON Schema
``errors``     the error tree: one base, one subtree per subsystem
``logs``       structured logging with per-domain context
``sqlite``     SQLite transactions off the event loop (the ledger's and the job store's)
``shielding``  ``to_completion``: clean-ups that finish through any number of cancellations
``retry``      the one retry helper (jittered exponential back-off)
``statelock``  one process at a time on a state directory
``sdnotify``   systemd readiness
``faults``     crash points that tests arm to kill the agent at a named step

May import: the standard library and third-party packages only.
"""
