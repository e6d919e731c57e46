"""libvirt-backup-agent: event-driven incremental backups of libvirt/KVM domains.

The subpackages are layers; each imports only from those below it (import-linter checks
this, ``[tool.importlinter]`` in ``pyproject.toml``)::

    cli  ->  service  ->  handlers  ->  control  ->  backup  ->  chain
         ->  virt | nbd | repository  (siblings: none imports another)
         ->  qemu  ->  core

``service`` is the composition root that wires the rest together.
"""
