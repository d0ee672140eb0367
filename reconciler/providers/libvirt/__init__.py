"""The libvirt provider package: the only code that imports libvirt."""
from .provider import LibvirtProvider
from . import backup  # noqa: F401,E402  registers the Snapshot, Restore and BackupPolicy handlers and readers

__all__ = ["LibvirtProvider"]
