"""The replay window (hub/dispatch/window.py): what it claims to cover, it holds whole."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from hub.dispatch.window import ReplayWindow
from hub.events import Event


def event(ms: int, seq: int = 0, pad: int = 0) -> Event:
    return Event(id=f"{ms}-{seq}", type="system_status", timestamp="2025-01-15T10:30:00.000Z",
                 data={"status": "online", "pad": "x" * pad})


@given(st.lists(st.tuples(st.integers(1, 5), st.integers(0, 300)), max_size=80),
       st.integers(1, 20), st.integers(200, 5000), st.integers(0, 400))
@settings(deadline=None)  # no timing threshold: a loaded machine stalls any example
def test_whatever_it_covers_it_holds_in_full_and_in_order(
        steps: list[tuple[int, int]], size: int, max_bytes: int, probe: int) -> None:
    window = ReplayWindow(size, max_bytes=max_bytes)
    added: list[Event] = []
    ms = 0
    for gap, pad in steps:
        ms += gap
        added.append(event(ms, pad=pad))
        window.add(added[-1])
    assert len(window) <= size
    after = (probe, 0)
    if window.covers(after):
        assert window.after(after, 10_000) == [e for e in added if e.key > after]
        assert window.after(after, 2) == [e for e in added if e.key > after][:2]
    if added:
        assert window.newest == added[-1].key
        assert window.covers(added[-1].key)  # the newest is always kept


def test_it_covers_from_its_oldest_entry_only() -> None:
    window = ReplayWindow(3)
    for ms in range(1, 6):
        window.add(event(ms))
    assert not window.covers((2, 0))  # 2-0 was dropped: what came between is unknown
    assert window.covers((3, 0)) and window.covers((4, 7))
    assert not window.covers((6, 0))  # ahead of this instance: ask the backend
    assert [e.id for e in window.after((3, 0), 10)] == ["4-0", "5-0"]


def test_an_out_of_order_delivery_starts_it_again() -> None:
    window = ReplayWindow(10)
    for ms in (1, 2, 3):
        window.add(event(ms))
    window.add(event(2, 1))
    assert not window.covers((1, 0))
    assert window.covers((2, 1)) and len(window) == 1


def test_size_zero_keeps_nothing() -> None:
    window = ReplayWindow(0)
    window.add(event(1))
    assert not window.covers((1, 0)) and window.newest is None


def test_a_resume_from_an_event_appended_late_starts_at_its_position() -> None:
    """After an outage an instance's event may be appended behind entries with higher ids
    (hub.dispatch.ledger.positioned): a client that saw it had every event before its
    position, so a resume from its id must not send those again."""
    from hub.dispatch.ledger import positioned

    window = ReplayWindow(10)
    late = positioned(event(5), "30-0")
    for e in (event(10), event(20), late, event(40)):
        window.add(e)
    assert window.position(late.id) == (30, 0)
    assert window.position("20-0") == (20, 0)
    assert [e.id for e in window.after(window.position(late.id), 10)] == ["40-0"]
