"""The Redis backend's ordering and identity rules (hub.dispatch.ledger), with no I/O.

A model of the Redis side (the stream and the append script's rules, hub.dispatch.redis
APPEND) and hypothesis drive interleavings of publish (with lost replies), read, lose Redis,
restart Redis empty, flush it, crash and restart an instance, through the real Ledger.
At the end every event acknowledged reached every instance that was running from before
its publish to the end exactly once, under the id its publish returned, in publish order
per publishing instance."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from hub.dispatch.ledger import Ids, Ledger, format_id
from hub.events import Event, id_key


@dataclass
class Stream:
    """What the APPEND script does, on a list instead of a Redis stream."""

    entries: list[tuple[tuple[int, int], str, bytes]] = field(default_factory=list)
    moved: dict[str, str] = field(default_factory=dict)
    top: tuple[int, int] = (0, 0)
    epoch: int = 0

    def append(self, event: Event, relocate: bool, now: int, epoch: int) -> tuple[str, str]:
        if epoch != self.epoch:
            return "reset", ""
        body = event.body()
        for _key, public, stored in self.entries:
            if public == event.id and stored == body:
                return "present", event.id
        if event.id in self.moved:
            return "present", event.id
        key = id_key(event.id)
        if key > self.top:
            self.top = key
            self.entries.append((key, event.id, body))
            return "added", event.id
        if not relocate:
            return "stale", format_id(self.top)
        self.top = (now, 0) if now > self.top[0] else (self.top[0], self.top[1] + 1)
        self.entries.append((self.top, event.id, body))
        self.moved[event.id] = format_id(self.top)
        return "moved", format_id(self.top)

    def after(self, key: tuple[int, int]) -> list[tuple[tuple[int, int], str, bytes]]:
        return [e for e in self.entries if e[0] > key]


@dataclass
class Instance:
    ledger: Ledger
    started: int  # the step it started at
    delivered: list[str] = field(default_factory=list)
    epoch: int = 0
    alive: bool = True

    def deliver(self, events: list[Event]) -> None:
        self.delivered += [e.id for e in events]


class LedgerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.redis = Stream()
        self.up = True
        self.now = 1_000
        self.step = 0
        self.salts = 0
        self.instances: list[Instance] = []
        self.journals: list[list[Event]] = []  # per slot: what a crash leaves on disk
        self.acked: dict[str, tuple[int, int, int]] = {}  # id -> (slot incarnation, n, step)
        self.publisher: dict[str, int] = {}  # id -> publishing incarnation
        self.order: dict[int, list[str]] = {}  # incarnation -> ids in publish order
        self.resets: list[int] = []  # steps at which Redis lost its data
        self.crashes: dict[int, int] = {}  # incarnation -> step it crashed at
        self.incarnations: list[Instance] = []
        self.n = 0
        for _ in range(2):
            self._start()

    # -- helpers ------------------------------------------------------------------------
    def _start(self, adopted: list[Event] | None = None) -> None:
        self.salts += 1
        ledger = Ledger(ids=Ids(salt=self.salts), recent_limit=10_000)
        if self.redis.entries:
            ledger.last_read = self.redis.entries[-1][0]
        ledger.ids.learn(self.redis.top)
        ledger.adopt(adopted or [])
        inst = Instance(ledger, self.step, epoch=self.redis.epoch)
        self.instances.append(inst)
        self.journals.append(list(adopted or []))
        self.incarnations.append(inst)
        if self.up:
            ledger.reader_back()

    def _tick(self, advance: int) -> None:
        self.now += advance
        self.step += 1

    def _slot(self, i: int) -> Instance:
        return self.instances[i % len(self.instances)]

    def _journal(self, inst: Instance) -> None:
        slot = self.instances.index(inst)
        journal = self.journals[slot]
        journal += inst.ledger.take_new_pending()
        pending = {e.id for e in inst.ledger.pending}
        self.journals[slot] = [e for e in journal if e.id in pending]

    # -- rules --------------------------------------------------------------------------
    @rule(i=st.integers(0, 3), advance=st.integers(0, 2), lost_reply=st.booleans())
    def publish(self, i: int, advance: int, lost_reply: bool) -> None:
        self._tick(advance)
        inst = self._slot(i)
        ledger = inst.ledger
        self.n += 1
        event = Event(id=ledger.new_id(self.now), type="t", timestamp="x", data={"n": self.n})
        if not ledger.must_spool and self.up:
            while True:
                outcome, detail = self.redis.append(event, False, self.now, inst.epoch)
                if outcome != "stale":
                    break
                ledger.stale(detail)
                event = Event(id=ledger.new_id(self.now), type="t", timestamp="x",
                              data={"n": self.n})
            if outcome == "reset":
                self._check_epoch(inst)
            elif not lost_reply:
                inst.deliver(ledger.appended(event))
                self._journal(inst)
                self._ack(inst, event)
                return
        # Redis down, or the reply was lost (the command ran): the pending path.
        inst.deliver(ledger.take_over())
        self._journal(inst)  # taken over first, as RedisBackend.publish does
        self.journals[self.instances.index(inst)].append(event)
        ledger.spool(event)
        inst.deliver([event])
        self._ack(inst, event)

    def _ack(self, inst: Instance, event: Event) -> None:
        incarnation = self.incarnations.index(inst)
        self.acked[event.id] = (incarnation, event.data["n"], self.step)
        self.order.setdefault(incarnation, []).append(event.id)

    @rule(i=st.integers(0, 3), count=st.integers(1, 5))
    def read(self, i: int, count: int) -> None:
        self._tick(0)
        inst = self._slot(i)
        ledger = inst.ledger
        if not self.up or not ledger.reader_up:
            return
        for key, public, body in self.redis.after(ledger.last_read)[:count]:
            position = format_id(key)
            inst.deliver(ledger.read(position, public, functools.partial(Event.from_body,
                                                                         public, body)))
            self._journal(inst)

    @rule(i=st.integers(0, 3))
    def flush(self, i: int) -> None:
        self._tick(1)
        inst = self._slot(i)
        if self.up and inst.ledger.pending:
            event = inst.ledger.pending[0]
            if self.redis.append(event, True, self.now, inst.epoch)[0] == "reset":
                self._check_epoch(inst)
                return
            inst.ledger.flushed(event)
            self._journal(inst)

    @rule(i=st.integers(0, 3))
    def reader_fails(self, i: int) -> None:
        inst = self._slot(i)
        if inst.ledger.reader_up:
            inst.deliver(inst.ledger.reader_lost())
            self._journal(inst)

    @rule(i=st.integers(0, 3))
    def reader_back(self, i: int) -> None:
        inst = self._slot(i)
        if self.up and not inst.ledger.reader_up:
            self._check_epoch(inst)
            inst.ledger.reader_back()

    @rule(i=st.integers(0, 3))
    def epoch_check(self, i: int) -> None:
        if self.up:
            self._check_epoch(self._slot(i))

    def _check_epoch(self, inst: Instance) -> None:
        if inst.epoch != self.redis.epoch:
            inst.epoch = self.redis.epoch
            inst.deliver(inst.ledger.redis_reset())
            self._journal(inst)

    @rule()
    def lose_redis(self) -> None:
        self._tick(1)
        self.up = False
        for inst in self.instances:
            if inst.ledger.reader_up:
                inst.deliver(inst.ledger.reader_lost())
                self._journal(inst)

    @rule()
    def redis_returns(self) -> None:
        self._tick(1)
        self.up = True

    @rule(restart=st.booleans())
    def redis_loses_data(self, restart: bool) -> None:
        """Restarted empty (connections lost) or flushed (connections kept)."""
        self._tick(1)
        if restart:
            self.lose_redis()
            self.up = True
        self.redis = Stream(epoch=self.redis.epoch + 1)
        self.resets.append(self.step)

    @rule(i=st.integers(0, 3))
    def crash_and_restart(self, i: int) -> None:
        """kill -9 (or SIGTERM with the journal not drained): clients gone, journal kept."""
        self._tick(1)
        slot = i % len(self.instances)
        inst = self.instances[slot]
        inst.alive = False
        self.crashes[self.incarnations.index(inst)] = self.step
        journal = self.journals[slot]
        del self.instances[slot]
        del self.journals[slot]
        self._start(adopted=sorted(journal, key=lambda e: e.key))  # as Journal.open does

    # -- checks -------------------------------------------------------------------------
    @invariant()
    def no_duplicates_and_ids_kept(self) -> None:
        for inst in self.incarnations:
            assert len(inst.delivered) == len(set(inst.delivered)), inst.delivered
            assert set(inst.delivered) <= set(self.acked)

    def teardown(self) -> None:
        # Heal: Redis up, every reader back, every journal flushed, everything read.
        self.up = True
        for inst in self.instances:
            self.reader_back(self.instances.index(inst))
        for _ in range(3):
            for inst in self.instances:
                self._check_epoch(inst)
                if not inst.ledger.reader_up:
                    inst.ledger.reader_back()
                while inst.ledger.pending:
                    self.flush(self.instances.index(inst))
            for inst in self.instances:
                self.read(self.instances.index(inst), 10_000)
        for inst in self.instances:
            got = inst.delivered
            assert len(got) == len(set(got))
            position = {event_id: k for k, event_id in enumerate(got)}
            for event_id, (incarnation, _n, step) in self.acked.items():
                if step < inst.started:
                    continue
                crashed = self.crashes.get(incarnation)
                if crashed is not None and any(r > step for r in self.resets):
                    continue  # its publisher crashed and Redis lost it: a double fault
                assert event_id in position, (event_id, incarnation, step, inst.started)
            for ids in self.order.values():
                mine = [position[i] for i in ids if i in position]
                assert mine == sorted(mine), "publish order per instance"


def _check_settings() -> Any:
    return settings(max_examples=300, stateful_step_count=40, deadline=None)


LedgerMachine.TestCase.settings = _check_settings()
TestLedger = LedgerMachine.TestCase
