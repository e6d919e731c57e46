"""QEMU's own tools, run as child processes.

``images``    what ``qemu-img`` says of an image and its bitmaps; ``qemu-img`` run bounded
``qemu_nbd``  a local ``qemu-nbd`` serving a repository image while it is written

May import: :mod:`agent.core` only.
"""
