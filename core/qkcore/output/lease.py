"""The lock of a data root on object storage: a lease object ``ROOT/.qkcore/lease.json``.

The lease names its holder (pid, host, user, command, since), a random token and an
expiry. It is taken with a conditional create (S3 ``If-None-Match: *``), renewed by a
background thread every third of its length (``If-Match`` on the ETag the holder last
wrote), and deleted on release. A live lease held by someone else refuses the run with
one line naming the holder and when the lease expires. An expired lease (its holder died
without releasing it, or lost the store for longer than the lease) is taken over with a
conditional replace on the ETag it was read with, and the log says whose it was. A lease
whose holder is on this host and whose process is gone is taken over at once.

The length is ``QKCORE_LEASE_S`` seconds (default 120). Expiry is compared with this
machine's clock: machines that share a root need clocks within a fraction of that.
"""

from __future__ import annotations

import getpass
import json
import os
import socket
import threading
import uuid
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
import structlog

from qkcore.errors import QkcoreError
from qkcore.output.store import Conditional, Conflict, cause

log = structlog.get_logger(__name__)

LEASE_FILE = "lease.json"
#: Tokens of the leases this process holds now: a lease naming this process with another token is a leftover.
_LIVE_TOKENS: set[str] = set()


def lease_seconds() -> float:
    """The lease length (``QKCORE_LEASE_S``, default 120 s)."""
    try:
        return max(1.0, float(os.environ.get("QKCORE_LEASE_S", "120")))
    except ValueError:
        return 120.0


@dataclass(frozen=True)
class Holder:
    """What a lease says of its holder."""

    pid: int
    host: str
    user: str
    command: str
    since: str
    token: str
    expires: str

    @classmethod
    def parse(cls, data: bytes) -> Holder | None:
        """The holder a lease object names; ``None`` when it cannot be read (treated as expired)."""
        try:
            raw = json.loads(data)
            return cls(int(raw["pid"]), str(raw["host"]), str(raw.get("user", "?")), str(raw.get("command", "?")),
                       str(raw["since"]), str(raw["token"]), str(raw["expires"]))
        except (ValueError, KeyError, TypeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()

    @property
    def expires_at(self) -> datetime:
        return datetime.fromisoformat(self.expires)

    def expired(self, now: datetime) -> bool:
        return self.expires_at <= now

    def dead_here(self) -> bool:
        """Whether the holder is a process on this host that no longer runs (or this process, which let it go)."""
        if self.host != socket.gethostname():
            return False
        if self.pid == os.getpid():
            return self.token not in _LIVE_TOKENS
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return True
        except OSError:
            return False
        return False

    def describe(self) -> str:
        return (f"process {self.pid} on {self.host} (user {self.user}, since {self.since}: {self.command}); "
                f"its lease expires at {self.expires} unless renewed")


class Lease:
    """This process's lease on one data root (see the module docstring)."""

    def __init__(self, store: Conditional, path: str, url: str) -> None:
        self.store, self.path, self.url = store, path, url
        self.length = lease_seconds()
        self.token = uuid.uuid4().hex
        self._tag: str | None = None
        self._holder: Holder | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def _new_holder(self, command: str, since: str | None = None) -> Holder:
        now = _now()
        return Holder(os.getpid(), socket.gethostname(), _user(), command,
                      since or now.isoformat(timespec="seconds"), self.token,
                      (now + timedelta(seconds=self.length)).isoformat(timespec="milliseconds"))

    def acquire(self, command: str) -> str:
        """Take the lease (or take over an expired one); start renewing it. Returns the token."""
        holder = self._new_holder(command)
        try:
            self._tag = self.store.create(self.path, holder.to_bytes())
        except Conflict:
            current = self.store.read(self.path)
            if current is None:  # released in between: try once more
                try:
                    self._tag = self.store.create(self.path, holder.to_bytes())
                except Conflict:
                    raise QkcoreError(f"output.data_root: {self.url} was just taken by another process; "
                                      "wait for it to finish") from None
            else:
                data, tag = current
                other = Holder.parse(data)
                if other is not None and not other.expired(_now()) and not other.dead_here():
                    raise QkcoreError(f"output.data_root: {self.url} is in use by {other.describe()}; "
                                      "wait for it to finish") from None
                try:
                    self._tag = self.store.replace(self.path, holder.to_bytes(), tag)
                except Conflict:
                    raise QkcoreError(f"output.data_root: {self.url} was just taken by another process; "
                                      "wait for it to finish") from None
                why = "expired" if other is None or other.expired(_now()) else "its process is gone"
                log.warning(f"took over the lease of {self.url}: {why}",
                            previous=None if other is None else other.describe())
        self._holder = holder
        _LIVE_TOKENS.add(self.token)
        self._thread = threading.Thread(target=self._renew_loop, name="qkcore-lease", daemon=True)
        self._thread.start()
        return self.token

    def _renew_loop(self) -> None:
        while not self._stop.wait(self.length / 3):
            self.renew()

    def renew(self) -> None:
        """Push the expiry forward, if the lease is still this process's; note it lost otherwise."""
        with self._lock:
            if self._lost is not None or self._holder is None or self._tag is None:
                return
            holder = self._new_holder(self._holder.command, self._holder.since)
            try:
                self._tag = self.store.replace(self.path, holder.to_bytes(), self._tag)
                self._holder = holder
            except Conflict:
                current = self.store.read(self.path)
                other = None if current is None else Holder.parse(current[0])
                self._lost = "another process took it over" + ("" if other is None else f": {other.describe()}")
                log.error(f"lost the lease of {self.url}: {self._lost}")
            except Exception as exc:  # noqa: BLE001 - the store is away: keep the lease while it has not expired
                log.warning(f"could not renew the lease of {self.url}", error=cause(exc), expires=self._holder.expires)

    def check(self) -> None:
        """Fail with one line unless this process still holds the lease (before the record, the commit point, is written)."""
        with self._lock:
            lost = self._lost
            if lost is None and self._holder is not None and self._holder.expired(_now()):
                lost = f"it expired at {self._holder.expires} before it could be renewed"
        if lost is None:
            current = self.store.read(self.path)
            holder = None if current is None else Holder.parse(current[0])
            if holder is None or holder.token != self.token:
                lost = "it is gone" if holder is None else f"another process took it over: {holder.describe()}"
        if lost is not None:
            raise QkcoreError(f"output.data_root: this run no longer holds the lease of {self.url} ({lost}); "
                              "nothing was published: rerun the same command when the root is free")

    def release(self) -> None:
        """Stop renewing and delete the lease if it is still this process's (a failure leaves it to expire)."""
        self._stop.set()
        _LIVE_TOKENS.discard(self.token)
        if self._thread is not None:
            self._thread.join(timeout=5)
        try:
            current = self.store.read(self.path)
            holder = None if current is None else Holder.parse(current[0])
            if holder is not None and holder.token == self.token:
                self.store.fs.rm_file(self.path)
        except Exception as exc:  # noqa: BLE001 - it expires on its own
            log.warning(f"could not release the lease of {self.url}; it expires on its own", error=cause(exc))


def check_held(store: Conditional, path: str, url: str, token: str) -> str:
    """``token`` if the lease of ``url`` is live under it, else one line saying who holds it (or that nobody does)."""
    current = store.read(path)
    holder = None if current is None else Holder.parse(current[0])
    if holder is None or holder.expired(_now()):
        raise QkcoreError(f"output.data_root: {url} is no longer held by the sweep that started this task (its lease "
                          "ended); run the sweep again, it resumes from the last commit")
    if holder.token != token:
        raise QkcoreError(f"output.data_root: {url} is in use by {holder.describe()}, not by the sweep that started "
                          "this task")
    return token


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name is no reason to fail
        return str(os.getuid()) if hasattr(os, "getuid") else "?"

