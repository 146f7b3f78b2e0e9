"""The outage journal (hub.dispatch.journal): fsynced appends, adoption after a stop or a
crash, a torn last line, the bound."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from hub.dispatch.journal import Journal, JournalFull
from hub.dispatch.ledger import Ids
from hub.events import Event


def _event(n: int, ids: Ids) -> Event:
    return Event(id=ids.next(1_000), type="system_status", timestamp="2025-01-15T10:30:00.000Z",
                 data={"status": "online", "n": n})


def test_a_crashed_instances_outstanding_events_are_adopted_in_order(tmp_path: Path) -> None:
    ids = Ids()
    events = [_event(n, ids) for n in range(5)]
    # A child process journals five events, marks two done, and is killed (no close()).
    script = (
        "import os, sys\n"
        "from pathlib import Path\n"
        "from hub.dispatch.journal import Journal\n"
        "from hub.events import Event\n"
        "j = Journal(Path(sys.argv[1]), 'dead', 100)\n"
        "j.open()\n"
        "for line in sys.stdin:\n"
        "    i, body = line.rstrip('\\n').split(' ', 1)\n"
        "    j.append(Event.from_body(i, body))\n"
        "j.done(sys.argv[2]); j.done(sys.argv[3])\n"
        "os.write(j._fd, b'{\"a\": \"torn')\n"  # a crash in the middle of a write
        "os.kill(os.getpid(), 9)\n")
    feed = "".join(f"{e.id} {e.body().decode()}\n" for e in events)
    child = subprocess.run([sys.executable, "-c", script, str(tmp_path), events[1].id,
                            events[3].id], input=feed, text=True, env={**os.environ})
    assert child.returncode == -9
    journal = Journal(tmp_path, "new", 100)
    adopted = journal.open()
    assert [e.data["n"] for e in adopted] == [0, 2, 4]
    assert [e.id for e in adopted] == [events[0].id, events[2].id, events[4].id]
    assert len(journal) == 3
    assert not (tmp_path / "dead.journal").exists()  # its events are in ours now
    for event in adopted:
        journal.done(event.id)
    journal.close()
    assert list(tmp_path.iterdir()) == []


def test_a_running_instances_journal_is_not_adopted(tmp_path: Path) -> None:
    ids = Ids()
    live = Journal(tmp_path, "live", 10)
    live.open()
    live.append(_event(0, ids))
    other = Journal(tmp_path, "other", 10)
    assert other.open() == []
    other.close()
    live.close()  # one outstanding: kept on disk for the next instance
    assert (tmp_path / "live.journal").exists()
    assert [e.data["n"] for e in Journal(tmp_path, "next", 10).open()] == [0]


def test_past_the_bound_new_events_are_refused_not_dropped(tmp_path: Path) -> None:
    ids = Ids()
    journal = Journal(tmp_path, "j", 3)
    journal.open()
    for n in range(3):
        journal.append(_event(n, ids))
    with pytest.raises(JournalFull):
        journal.append(_event(3, ids))
    journal.append_many([_event(4, ids)], force=True)  # taken over: acknowledged already
    assert len(journal) == 4
    journal.close()


def test_ids_from_different_sources_never_collide_and_always_grow() -> None:
    a, b = Ids(salt=1), Ids(salt=2)
    seen: set[str] = set()
    last = {id(a): (0, 0), id(b): (0, 0)}
    for now in [5, 5, 5, 4, 6, 6]:
        for source in (a, b):
            new = source.next(now)
            ms, seq = map(int, new.split("-"))
            key = (ms, seq)
            assert new not in seen and key > last[id(source)]
            seen.add(new)
            last[id(source)] = key
            a.learn(key)  # a sees b's ids in the stream, b does not see a's
