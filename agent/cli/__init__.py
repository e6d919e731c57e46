"""The command line, ``backup-agent``: one module per group of verbs.

``main``     argument parsing, ``run`` and ``config``, and the dispatch to the others
``backups``  ``backup --local``, ``backups``, ``restore``, ``verify``
``chains``   ``checkpoints``, ``reconcile``, ``ledger export|import``
``control``  ``backup``, ``jobs``, ``cancel``, ``status``: clients of the running agent
``repository`` ``repository init``: the repository this agent uses
``progress`` the one progress bar the long verbs show on a terminal (rich)

The top layer: may import everything. Heavy imports (libvirt, aiohttp) happen inside
the verbs that need them, so ``config --show`` starts fast.
"""
