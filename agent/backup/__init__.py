"""One backup job: plan, begin, copy, end, publish, or undo everything.

``plan``         per disk, full or incremental, and why (pure)
``run``          the job itself, step by step (:class:`Backups`)
``job``          what a job creates, and its intent file (written before it creates any)
``libvirt_job``  libvirt's side of the job: its XML, begin, end and the wait for its end
``disks``        the disks of one job, copied in parallel on the data plane
``copy``         **where bytes are copied**: block status to runs, workers, checksums
``data_plane``   the second event loop (own thread) the NBD copies run on
``progress``     bytes copied so far (throttled reports), seconds per phase
``undo``         undoing a failed or cancelled job; recovering those a killed agent left
``whole_vm``     a whole VM back from a backup point: its disks restored, the domain defined

May import: :mod:`agent.chain` and every layer below it.
"""
