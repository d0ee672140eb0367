"""The libvirt provider package: the only code that imports libvirt."""
from .provider import LibvirtProvider
from . import backup  # noqa: F401,E402  registers the Snapshot, Restore and BackupPolicy handlers and readers
from . import network  # noqa: F401,E402  registers the Network handlers and reader

__all__ = ["LibvirtProvider"]
