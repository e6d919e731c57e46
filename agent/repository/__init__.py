"""The backup repository: qcow2 chains and their manifests on a filesystem.

May import: :mod:`agent.core`, :mod:`agent.qemu`. Not :mod:`agent.virt` or
:mod:`agent.nbd` (siblings), nor any layer above.
"""
