"""Where a run's dataset goes: the data root interface, its backends, and the factory that picks one.

==================  ==================================================================
module              job
==================  ==================================================================
``protocol.py``     :class:`DataRoot`: what the run and the rule need of a data root
``record.py``       ``run.json``: which run the published files belong to, and those files
``local.py``        :class:`LocalDataRoot`: a local folder, published by rename
==================  ==================================================================

The run builds its data root with :func:`open_output` and nothing else; a new backend
(object storage through fsspec) is one module implementing :class:`DataRoot`, chosen in
:func:`open_output`.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING

from qkcore.output.local import LocalDataRoot
from qkcore.output.protocol import DataRoot
from qkcore.output.record import FileEntry, Record, UnreadableRecord, file_entry, readable_record

if TYPE_CHECKING:
    from qkcore.config import OutputConfig

__all__ = [
    "DataRoot", "FileEntry", "LocalDataRoot", "Record", "UnreadableRecord", "command_line", "file_entry", "open_output",
    "readable_record",
]


def open_output(output_cfg: OutputConfig) -> DataRoot:
    """The data root ``output_cfg`` (the config's ``output`` section) names.

    ``output.data_root`` is a local folder today, so this is always a :class:`LocalDataRoot`.
    """
    return LocalDataRoot(output_cfg.data_root)


def command_line() -> str:
    """This process's command line, naming the lock's holder."""
    return " ".join(sys.argv) or "python"
