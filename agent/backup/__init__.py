"""One backup job: plan, begin, copy, end, publish, or undo everything.

``plan``        per disk, full or incremental, and why (pure)
``run``         the job itself and its undo
``copy``        **where bytes are copied**: block status to runs, workers, checksums
``data_plane``  the second event loop (own thread) the NBD copies run on

May import: :mod:`agent.chain` and every layer below it.
"""
