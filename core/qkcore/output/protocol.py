"""What a run needs of the place its dataset goes: :class:`DataRoot`.

The run (:mod:`qkcore.sniff`) and the rule (:mod:`qkcore.root_policy`) see a data root
only through this protocol, built by :func:`qkcore.output.open_output` from
``output.*``. A new backend (object storage through fsspec, say) is one module that
implements it, plus its line in that factory.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from pathlib import Path
from typing import Protocol

from qkcore.manifest import Manifest
from qkcore.output.record import Record


class DataRoot(Protocol):
    """One ``output.data_root``: one run's published files, their record, a lock, and local work folders.

    **The rule** (:mod:`qkcore.root_policy`). A data root holds exactly one run. Its
    published files are the card, the manifest and each config's data file (names in
    :mod:`qkcore.layout`); its record (:class:`~qkcore.output.record.Record`) says
    which run they belong to, their sizes and hashes, and whether they were pushed.

    **Published data** may live wherever the backend keeps it; the run never reads or
    writes it by path, only through :meth:`read_manifest`, :meth:`verify`,
    :meth:`publish` and :meth:`local_copy`.

    **Work folders stay local**: :attr:`staging_dir` (spill parts and journal of the
    capture in progress), :attr:`final_dir` (finished files waiting to be published)
    and :meth:`rank_staging` (the staging of a torchrun rank, or of shard ``rank`` of a
    ``qkcore sweep --shards K`` run) are directories on this
    machine, under :attr:`work_dir`, whatever the backend: the writer spills,
    hard-links and renames there, and :meth:`publish` takes new files from
    :attr:`final_dir`.
    """

    @property
    def location(self) -> str:
        """Where the published data is, for messages and logs (a path, or a URL)."""
        ...

    # -- local work folders -----------------------------------------------------
    @property
    def work_dir(self) -> Path:
        """The local folder holding the work folders (its free disk bounds the run)."""
        ...

    @property
    def staging_dir(self) -> Path:
        """The capture in progress: spill parts and journal (:mod:`qkcore.writer`)."""
        ...

    @property
    def final_dir(self) -> Path:
        """The next run's finished files, waiting to be published."""
        ...

    @property
    def ranks_dir(self) -> Path:
        """torchrun ranks' staging, until rank 0 merges it."""
        ...

    def rank_staging(self, rank: int) -> Path:
        """Where torchrun rank ``rank`` stages its parts."""
        ...

    def staged_ranks(self) -> list[int]:
        """Ranks whose staging exists."""
        ...

    def save_staged(self, rank: int) -> None:
        """Make rank ``rank``'s committed staging (its journal and the parts it names) visible to every machine.

        Called after each commit of a unit that another machine may resume or merge (a
        ``--shards`` task). A local root does nothing: its folder is where every process
        sees it. A root on object storage uploads the new parts, then the journal.
        """
        ...

    def load_staged(self, rank: int) -> None:
        """Bring rank ``rank``'s committed staging to :meth:`rank_staging` on this machine (a local root: nothing).

        Called before a ``--shards`` task resumes its shard and before the finalize merges them.
        """
        ...

    def discard_work(self) -> None:
        """Remove staged and finished-but-unpublished work (staging, final, ranks); published files stay."""
        ...

    # -- use ----------------------------------------------------------------------
    def has_state(self) -> bool:
        """Whether qkcore ever used this data root (its state is there); creates nothing."""
        ...

    def check_usable(self) -> None:
        """Fail now, with one line, if the data root cannot hold a run; prepare what the lock needs."""
        ...

    def forget_if_unused(self) -> None:
        """Undo what :meth:`check_usable` created, if the run left nothing."""
        ...

    def locked(self, command: str, *, held: str | None = None) -> AbstractContextManager[str]:
        """Hold the data root's exclusive lock (``command`` names the holder); a second holder fails at once.

        Yields the lock's token. With ``held=TOKEN`` the caller takes no lock of its own: it
        checks that the root is held under ``TOKEN`` right now (a ``qkcore sweep`` holds the
        lock of every root it runs, and its tasks, in other processes or on other machines,
        run under it) and fails with one line naming the holder otherwise.
        """
        ...

    # -- the published run ------------------------------------------------------
    def read_record(self) -> Record | None:
        """The record of the run this root publishes, or ``None`` when there is none."""
        ...

    def write_record(self, record: Record) -> None:
        """Write the record durably."""
        ...

    def dataset_files(self) -> list[str]:
        """Published files present (repo paths): the card, the manifest and every config's data file."""
        ...

    def verify(self, record: Record) -> list[str]:
        """Problems with the published files against ``record`` (empty: they match exactly).

        The one meaning of "unchanged" (``qkcore sniff`` and ``qkcore push`` both use it):
        every recorded file is there with its recorded size and sha256; a backend may
        reuse a digest only while it can tell the file was not touched since. Dataset
        files that the record does not list are problems too.
        """
        ...

    def publish(self, record: Record) -> Record:
        """Make the root hold exactly ``record.files``, taking new files from :attr:`final_dir`; return the complete record.

        Under a record that says ``publishing`` first, so a kill midway is finished by
        calling it again.
        """
        ...

    def read_manifest(self) -> Manifest | None:
        """The published manifest (``qkcore.json``), ``None`` if there is none."""
        ...

    def local_copy(self) -> AbstractContextManager[Path]:
        """A local folder holding the published files, for tools that need paths (the Hub push)."""
        ...
