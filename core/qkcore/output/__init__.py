"""Where a run's dataset goes: the data root interface, its backends, and the factory that picks one.

==================  ==================================================================
module              job
==================  ==================================================================
``protocol.py``     :class:`DataRoot`: what the run and the rule need of a data root
``record.py``       ``run.json``: which run the published files belong to, and those files
``local.py``        :class:`LocalDataRoot`: a local folder, published by rename
``remote.py``       :class:`RemoteDataRoot`: a URL on object storage (fsspec), the record as commit point
``lease.py``        the lock of a remote root: a lease object with holder, token and expiry
``store.py``        the fsspec filesystem of a URL: bounded retries, conditional writes, one error line
==================  ==================================================================

The run builds its data root with :func:`open_output` and nothing else: a local path is a
:class:`LocalDataRoot`, a URL (``s3://``, ``gs://``, ``hf://``, ``memory://``) a :class:`RemoteDataRoot`.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping

from qkcore.output.local import LocalDataRoot
from qkcore.output.protocol import DataRoot
from qkcore.output.store import url_scheme
from qkcore.output.remote import RemoteDataRoot
from qkcore.output.record import FileEntry, Record, UnreadableRecord, file_entry, readable_record

if TYPE_CHECKING:
    from qkcore.config import OutputConfig

__all__ = [
    "DataRoot", "FileEntry", "LocalDataRoot", "Record", "RemoteDataRoot", "UnreadableRecord", "command_line", "file_entry", "open_output", "open_root",
    "readable_record",
]


def open_output(output_cfg: OutputConfig) -> DataRoot:
    """The data root ``output_cfg`` (the config's ``output`` section) names.

    A URL (a ``str`` with a scheme, see :func:`qkcore.output.store.url_scheme`) is a
    :class:`RemoteDataRoot`; a local folder a :class:`LocalDataRoot`.
    """
    return open_root(output_cfg.data_root, output_cfg.storage_options)


def open_root(data_root: Path | str, storage_options: Mapping[str, Any] | None = None) -> DataRoot:
    """The data root at a local path or URL (for commands that take one on the command line)."""
    if isinstance(data_root, str) and url_scheme(data_root) is not None:
        return RemoteDataRoot(data_root, storage_options)
    return LocalDataRoot(data_root)


def command_line() -> str:
    """This process's command line, naming the lock's holder."""
    return " ".join(sys.argv) or "python"
