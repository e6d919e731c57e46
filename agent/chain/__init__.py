"""**Where the chain is kept**: the checkpoint ledger, the chain's rules, checkpoints in
libvirt.

``records``        the data: checkpoints, their disks, each disk's chain
``validation``     what makes a record sound, for writes, imports and reads alike
``rules``          the rules, as pure functions: names, order, redefine XML, verdicts, pruning
``ledger``         the ledger, SQLite in ``<state_dir>/ledger.sqlite``: the ``Ledger`` class
``ledger_schema``  the ledger file's schema and migrations; opening and checking it
``ledger_sql``     the ledger's SQL statements, run in its worker thread
``ledger_ops``     the ledger's writes as operations, applied in one transaction
``ledger_export``  one domain's records as JSON-able data; parsing and importing it
``checkpoints``    the only code that changes checkpoints in libvirt or the ledger
``libvirt_calls``  the blocking libvirt calls on checkpoints that ``checkpoints`` makes
``damage``         a verify's damaged backups break the chains of their disks

May import: :mod:`agent.virt`, :mod:`agent.nbd`, :mod:`agent.repository`,
:mod:`agent.qemu`, :mod:`agent.core`.
"""
