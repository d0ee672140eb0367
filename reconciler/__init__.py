"""reconciler: make libvirt hosts and Mosquitto brokers match YAML manifests."""
from .errors import ApplyError, LockError, ManifestError, ReconcilerError, TargetError
from .model import Action, FieldChange, Live, Options, Plan, Resource, ResourceId, Result, Snapshot

__version__ = "0.1.0"
__all__ = ["Action", "ApplyError", "FieldChange", "Live", "LockError", "ManifestError", "Options", "Plan",
           "ReconcilerError", "Resource", "ResourceId", "Result", "Snapshot", "TargetError", "__version__"]
