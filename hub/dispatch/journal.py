"""The local journal: events this instance acknowledged but Redis does not hold yet.

Each is appended and fsynced before its publish returns, so a ``202`` means "in Redis or in
this file" and survives SIGTERM and ``kill -9`` of the instance. One file per running
instance, locked with ``flock`` while it lives; at start-up an instance adopts every
unlocked file in its directory (left by a stopped or crashed instance on the same Redis and
stream), copies the events still outstanding into its own file and deletes the old one.

The file is JSON lines: ``{"a": id, "b": body}`` when an event is accepted,
``{"d": id}`` when it is in Redis. When nothing is outstanding, the file is truncated.
A torn last line (a crash mid-write) is ignored: its event was never acknowledged.

Bounded by ``max_events`` outstanding events: past it, :meth:`append` raises
:class:`JournalFull` and the publish is refused (503), never acknowledged and dropped.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import orjson

from hub.errors import BackendUnavailable, ErrorCode
from hub.events import Event

log = logging.getLogger("hub.journal")


class JournalFull(BackendUnavailable):
    """The journal holds ``max_events`` outstanding events; the publish is refused."""

    code = ErrorCode.JOURNAL_FULL


def default_journal_dir() -> Path:
    """``$XDG_STATE_HOME/hub/journal``, else ``~/.local/state/hub/journal`` (the Docker
    image sets ``HUB_JOURNAL_DIR=/var/lib/hub/journal``)."""
    state = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(state) / "hub" / "journal"


def _read(path: Path) -> list[Event]:
    """The outstanding events of one journal file, in order."""
    added: dict[str, Event] = {}
    with path.open("rb") as file:
        for line in file:
            try:
                record = orjson.loads(line)
                if "d" in record:
                    added.pop(str(record["d"]), None)
                else:
                    event = Event.from_body(str(record["a"]), record["b"])
                    added[event.id] = event
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                log.warning("journal %s: skipping an unreadable line (torn write?)", path)
    # In id order: each source's ids grow with its publishes, so this is publish order per
    # source (record order is not: an event appended again after Redis lost its data is
    # recorded after later ones).
    return sorted(added.values(), key=lambda e: e.key)


class Journal:
    def __init__(self, directory: Path, name: str, max_events: int) -> None:
        self.directory = directory
        self.path = directory / f"{name}.journal"
        self.max_events = max_events
        self._fd: int | None = None
        self._outstanding: set[str] = set()

    def __len__(self) -> int:
        return len(self._outstanding)

    def open(self) -> list[Event]:
        """Create this instance's file; adopt the files of instances no longer running.
        Returns the adopted events (outstanding in this journal now), in id order."""
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o600)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        self._fd = fd
        adopted: list[Event] = []
        others = sorted((p for p in self.directory.glob("*.journal") if p != self.path),
                        key=lambda p: p.stat().st_mtime)
        for path in others:
            events = self._adopt(path)
            if events:
                log.warning("journal: adopting %d event(s) left by a stopped instance in %s",
                            len(events), path.name)
            adopted += events
        return sorted(adopted, key=lambda e: e.key)

    def _adopt(self, path: Path) -> list[Event]:
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return []  # another instance adopted it meanwhile
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return []  # its instance is running
            if not path.exists():
                return []
            events = _read(path)
            self.append_many(events, force=True)
            path.unlink()
            return events
        finally:
            os.close(fd)

    def append(self, event: Event) -> None:
        """Record ``event`` durably (fsync) before it is acknowledged."""
        self.append_many([event])

    def append_many(self, events: Iterable[Event], *, force: bool = False) -> None:
        """``force``: events acknowledged already (taken over, adopted) are kept past the
        bound; only new publishes are refused at it."""
        records: list[tuple[str, bytes]] = []
        for event in events:
            if event.id in self._outstanding:
                continue
            if not force and len(self._outstanding) + len(records) >= self.max_events:
                raise JournalFull(
                    f"the outage journal holds {len(self._outstanding)} events "
                    f"(HUB_JOURNAL_MAX_EVENTS); refusing new ones until Redis takes them")
            records.append((event.id, orjson.dumps({"a": event.id,
                                                    "b": event.body().decode()})))
        if not records:
            return
        self._write(b"\n".join(r for _, r in records) + b"\n", sync=True)
        self._outstanding.update(i for i, _ in records)

    def done(self, event_id: str) -> None:
        """``event_id`` is in Redis now. Not fsynced: replaying it again is harmless
        (appends are idempotent by id)."""
        if event_id not in self._outstanding:
            return
        self._outstanding.discard(event_id)
        if self._outstanding:
            self._write(orjson.dumps({"d": event_id}) + b"\n", sync=False)
        elif self._fd is not None:
            os.ftruncate(self._fd, 0)

    def _write(self, data: bytes, *, sync: bool) -> None:
        if self._fd is None:
            raise BackendUnavailable("the outage journal is not open")
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self._fd, view):]
            if sync:
                os.fdatasync(self._fd)
        except OSError as exc:
            raise BackendUnavailable(f"cannot write the outage journal: {exc}") from exc

    def close(self) -> None:
        """Release the file; delete it when nothing is outstanding (else the next instance
        adopts it)."""
        if self._fd is None:
            return
        if not self._outstanding:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
        else:
            log.error("journal: stopping with %d event(s) not in redis yet; kept in %s for "
                      "the next instance to append", len(self._outstanding), self.path)
        os.close(self._fd)
        self._fd = None
