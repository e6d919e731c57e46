"""libvirt-backup-agent: event-driven incremental backups of libvirt/KVM domains."""
