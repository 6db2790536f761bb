"""Stage 5 of a run: publish the finalized files into the data root.

The data root (:class:`~qkcore.output.protocol.DataRoot`) moves them from its final
folder under a record that says ``publishing`` first, so a kill midway is finished by
publishing the same record again.
"""

from __future__ import annotations

from qkcore.output import DataRoot, Record
from qkcore.run_state import HubTarget, RunState


def publish(root: DataRoot, state: RunState, hub: HubTarget | None) -> Record:
    """Publish the files a ``finalized`` ``state`` lists; return the complete record (``hub``: its unpushed target)."""
    assert state.phase == "finalized" and state.summary is not None
    record = Record("publishing", state.identity, state.files, summary=state.summary, hub=hub)
    return root.publish(record)
