"""**Where the chain is kept**: the checkpoint ledger, the chain's rules, checkpoints in
libvirt.

``rules``        the rules, as pure functions: names, order, redefine XML, verdicts, pruning
``checkpoints``  the only code that changes checkpoints in libvirt or the ledger
``ledger``       the ledger, SQLite in ``<state_dir>/ledger.sqlite``

May import: :mod:`agent.virt`, :mod:`agent.nbd`, :mod:`agent.repository`,
:mod:`agent.qemu`, :mod:`agent.core`.
"""
