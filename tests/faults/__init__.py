"""The fault suite: each test breaks something real around the agent mid-way (libvirtd
SIGKILLed, the agent killed -9, a damaged or missing file, an unmounted, full or hung
filesystem, NATS racing) and ends with a backup that succeeds, restores byte for byte,
and leaves no libvirt job behind. Run it alone with ``pytest -m faults``."""
