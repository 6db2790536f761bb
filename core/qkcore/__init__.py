"""qkcore: capture post-RoPE query/key vectors and publish them as a Parquet dataset."""

__version__ = "0.1.0"

#: Entry-point group through which model-family plugins register themselves.
ENTRY_POINT_GROUP = "qkcore.plugins"

import pluggy as _pluggy

#: Decorator for plugin hook implementations: ``@qkcore.hookimpl``.
hookimpl = _pluggy.HookimplMarker("qkcore")
