"""The libvirt provider package: the only code that imports libvirt."""
from .provider import LibvirtProvider

__all__ = ["LibvirtProvider"]
