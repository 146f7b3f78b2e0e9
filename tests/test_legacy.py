"""The proxy's channel as hub reads it: ``Dispatcher.parse_legacy``, the timestamps it
normalises and the rooms it adds. Any well-formed envelope is taken with its ``data``
unchanged; nothing an envelope holds can stop the legacy loop."""

from __future__ import annotations

import contextlib
import json
import logging
import re
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hub.dispatch import Dispatcher
from hub.dispatch.memory import MemoryBackend
from hub.events import EventTypes, parse_timestamp
from hub.metrics import Metrics
from tests.conftest import RedisServer, make_settings, make_token, run_hub
from tests.helpers import THREAT, connected, recv_json, send_json, wait_until
from tests.sio_helpers import SioClient

RFC3339_MS_Z = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
PROXY_TYPES = ("status_change_alert", "system_health_update", "operational_event",
               "operational_error", "report_event", "scan_event")


def make_dispatcher(*, strict: bool = False, max_types: int = 64) -> Dispatcher:
    return Dispatcher(MemoryBackend(100), EventTypes(open_types=not strict, max_types=max_types),
                      Metrics(), max_data_bytes=64 * 1024, max_subscribe_types=64,
                      legacy_strict=strict)


@contextlib.contextmanager
def hub_logs(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Capture hub's log records: uvicorn's dictConfig replaces the root's handlers
    (caplog's among them) when a server starts, so attach caplog to hub's logger itself."""
    if caplog.handler in logging.getLogger().handlers:  # no server started since the test did
        yield
        return
    logger = logging.getLogger("hub")
    logger.addHandler(caplog.handler)
    try:
        yield
    finally:
        logger.removeHandler(caplog.handler)


def legacy_count(dispatcher: Dispatcher, result: str) -> float:
    return float(dispatcher.metrics.legacy.labels(result)._value.get())


# -- timestamps -------------------------------------------------------------------------
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(lambda m: timezone(timedelta(minutes=m)))


@given(st.datetimes(timezones=st.one_of(st.just(UTC), offsets)))
@settings(deadline=None)  # no timing threshold: a loaded machine stalls any example
def test_any_aware_isoformat_becomes_its_utc_instant_or_none(moment: datetime) -> None:
    result = parse_timestamp(moment.isoformat())
    try:
        utc = moment.astimezone(UTC)
    except OverflowError:  # outside the years 1 to 9999 once in UTC
        assert result is None
        return
    assert result is not None and RFC3339_MS_Z.fullmatch(result)
    assert datetime.fromisoformat(result[:-1] + "+00:00") == utc.replace(
        microsecond=utc.microsecond // 1000 * 1000)


@given(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=80),
                 st.binary(max_size=20), st.lists(st.integers(), max_size=2)))
@settings(deadline=None)
def test_parse_timestamp_is_total(value: object) -> None:
    result = parse_timestamp(value)
    assert result is None or RFC3339_MS_Z.fullmatch(result)


@pytest.mark.parametrize(("value", "expected"), [
    # What the proxy sends: datetime.now(timezone.utc).isoformat(), and time.time() in data.
    ("2026-02-05T10:30:00.123456+00:00", "2026-02-05T10:30:00.123Z"),
    (1770287400.5, "2026-02-05T10:30:00.500Z"),
    ("2026-02-05T10:30:00", "2026-02-05T10:30:00.000Z"),  # naive: UTC
    ("2026-02-05T05:30:00-05:00", "2026-02-05T10:30:00.000Z"),
    ("1770287400", "2026-02-05T10:30:00.000Z"),
    (1770287400123, "2026-02-05T10:30:00.123Z"),  # epoch milliseconds
    ("9999-12-31T23:59:59.999999-23:59", None),  # the year 10000 in UTC
    ("0001-01-01T00:00:00+00:01", None),
    (float("nan"), None), (1e300, None), ("", None), ("soon", None), (True, None),
])
def test_timestamp_shapes(value: object, expected: str | None) -> None:
    assert parse_timestamp(value) == expected


# -- parse_legacy -----------------------------------------------------------------------
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=3),
    max_leaves=12)
type_names = st.one_of(st.sampled_from((*PROXY_TYPES, "threat_detected", "system_status",
                                        "cost_threshold_alert")),
                       st.text(max_size=70), st.integers(), st.none())
timestamps = st.one_of(
    st.none(), st.floats(), st.integers(), st.text(max_size=40),
    st.sampled_from(["9999-12-31T23:59:59.999999-23:59", "2026-02-05T10:30:00+00:00"]),
    st.datetimes(timezones=st.one_of(st.just(UTC), offsets)).map(datetime.isoformat))
envelopes = st.fixed_dictionaries({}, optional={
    "type": type_names, "timestamp": timestamps,
    "data": st.one_of(st.dictionaries(st.text(max_size=8), json_values, max_size=4),
                      json_values)})
raw_inputs = st.one_of(
    envelopes.map(lambda e: json.dumps(e).encode()),  # as the proxy encodes (json.dumps)
    st.binary(max_size=120),
    json_values.map(lambda v: json.dumps(v).encode()),
    st.sampled_from([b"[" * 5000 + b"]" * 5000, b'{"type":"x","data":{"n":1e400}}',
                     b'{"type":"x","data":' + b'{"a":' * 3000 + b"1" + b"}" * 3001]))


@given(raw_inputs)
@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_parse_legacy_never_raises_and_keeps_data_unchanged(raw: bytes) -> None:
    dispatcher = make_dispatcher()
    result = dispatcher.parse_legacy(raw)
    try:
        envelope: Any = json.loads(raw)
        orjson.loads(raw)  # numbers beyond a double (1e400) are not JSON hub can carry
    except (ValueError, RecursionError):
        assert result is None
        return
    well_formed = (isinstance(envelope, dict) and isinstance(envelope.get("type"), str)
                   and re.fullmatch(r"[A-Za-z0-9_.:-]{1,64}", envelope["type"]) is not None
                   and isinstance(envelope.get("data"), dict))
    if not well_formed:
        assert result is None
        return
    try:
        encodable = len(orjson.dumps(envelope["data"])) <= 64 * 1024
    except TypeError:  # nested too deep to encode
        encodable = False
    if not encodable:
        assert result is None
        return
    assert result is not None
    type_, timestamp, data = result
    assert type_ == envelope["type"]
    assert data == envelope["data"]  # unchanged: no field added, none dropped
    assert RFC3339_MS_Z.fullmatch(timestamp)
    expected = parse_timestamp(envelope.get("timestamp"))
    if expected is not None:
        assert timestamp == expected
    assert type_ in dispatcher.rooms


def test_spec_types_with_other_data_are_taken_and_counted_nonconforming() -> None:
    dispatcher = make_dispatcher()
    proxy_threat = {"request_id": "r1", "endpoint": "/v1/chat/completions",
                    "attack_type": "prompt_injection", "confidence": None, "severity": "high",
                    "action_taken": "blocked", "user_id": "u1"}
    result = dispatcher.parse_legacy(json.dumps(
        {"type": "threat_detected", "timestamp": "2026-02-05T10:30:00+00:00",
         "data": proxy_threat}).encode())
    assert result == ("threat_detected", "2026-02-05T10:30:00.000Z", proxy_threat)
    assert legacy_count(dispatcher, "nonconforming") == 1
    conforming = dispatcher.parse_legacy(json.dumps(
        {"type": "threat_detected", "data": THREAT}).encode())
    assert conforming is not None and conforming[2] == THREAT  # no threat_id added
    assert legacy_count(dispatcher, "nonconforming") == 1


def test_strict_mode_refuses_other_data_and_unknown_types() -> None:
    dispatcher = make_dispatcher(strict=True)
    for envelope in ({"type": "threat_detected", "data": {**THREAT, "confidence": None}},
                     {"type": "status_change_alert", "data": {"message": "x"}}):
        assert dispatcher.parse_legacy(json.dumps(envelope).encode()) is None
    assert dispatcher.parse_legacy(json.dumps(
        {"type": "threat_detected", "data": THREAT}).encode()) is not None
    assert "status_change_alert" not in dispatcher.rooms


def test_new_types_get_rooms_up_to_the_bound(caplog: pytest.LogCaptureFixture) -> None:
    dispatcher = make_dispatcher(max_types=5)  # the spec's four and one more
    first = json.dumps({"type": "status_change_alert", "data": {}}).encode()
    second = json.dumps({"type": "report_event", "data": {}}).encode()
    assert dispatcher.parse_legacy(first) is not None
    with caplog.at_level(logging.WARNING, "hub.dispatch"):
        for _ in range(50):
            assert dispatcher.parse_legacy(second) is None
    assert "status_change_alert" in dispatcher.rooms
    assert "report_event" not in dispatcher.rooms
    refusals = [r for r in caplog.records if "HUB_MAX_EVENT_TYPES" in r.getMessage()]
    assert len(refusals) == 1  # rate-limited: one line for fifty envelopes


# -- the loop, on a real Redis ----------------------------------------------------------
BAD_ENVELOPES = [
    b"{not json", b"[]", b"null", b"\xff\xfe", b"[" * 5000 + b"]" * 5000,
    json.dumps({"type": 5, "data": {}}).encode(),
    json.dumps({"type": "threat_detected", "data": ["a list"]}).encode(),
    json.dumps({"data": {}}).encode(),
    json.dumps({"type": "x" * 100, "data": {}}).encode(),
    json.dumps({"type": 'a"b', "data": {}}).encode(),
    b'{"type":"threat_detected","data":{"n":1e400}}',
    b'{"type":"operational_event","data":' + b'{"a":' * 3000 + b"1" + b"}" * 3001,
    json.dumps({"type": "report_event", "data": {"blob": "x" * 70_000}}).encode(),
]


async def test_good_envelopes_around_bad_ones_all_arrive(
        redis_server: RedisServer, caplog: pytest.LogCaptureFixture) -> None:
    settings_ = make_settings(redis_url=redis_server.url)
    async with run_hub(settings_) as hub:
        channel = settings_.legacy_channel
        raw = redis_server.client()
        await wait_until(lambda: raw.pubsub_numsub(channel)[0][1] >= 1,
                         what="the hub to subscribe to the legacy channel")
        ws = await connected(hub.ws_url, make_token())
        sio = SioClient()
        await sio.connect(hub.url, auth={"token": make_token()})
        sio.client.on("operational_event", sio._recorder("operational_event"))
        goods: list[dict[str, Any]] = []
        with hub_logs(caplog):
            for n, bad in enumerate(BAD_ENVELOPES):
                good = {"type": "operational_event" if n % 2 else "threat_detected",
                        "timestamp": datetime.now(UTC).isoformat(),
                        "data": {"n": n, "confidence": None}}
                raw.publish(channel, json.dumps(good))
                goods.append(good)
                raw.publish(channel, bad)
            # A good envelope whose only fault is its timestamp: taken, stamped now.
            late = {"type": "threat_detected", "timestamp": "9999-12-31T23:59:59.999999-23:59",
                    "data": {"n": "late"}}
            raw.publish(channel, json.dumps(late))
            goods.append(late)
            for want in goods:
                got = await recv_json(ws)
                assert (got["type"], got["data"]) == (want["type"], want["data"])
                assert RFC3339_MS_Z.fullmatch(got["timestamp"])
                via_sio = await sio.next_event()
                assert (via_sio["id"], via_sio["data"]) == (got["id"], want["data"])
        metrics = hub.hub.metrics

        def counted(result: str) -> float:
            return float(metrics.legacy.labels(result)._value.get())
        # Counted when the claim script's reply is back, which may come after the stream
        # reader delivered the event; and `connected` folds in 2 s windows that a stalled
        # machine crosses: poll both.
        await wait_until(lambda: counted("invalid") >= len(BAD_ENVELOPES)
                         and counted("appended") >= len(goods), what="every envelope counted")
        assert counted("invalid") == len(BAD_ENVELOPES)
        assert counted("appended") == len(goods)
        backend = hub.hub.dispatcher.backend  # the loop never went down
        await wait_until(lambda: backend.connected, what="the backend to be healthy")
        assert not [r for r in caplog.records if "crashed" in r.getMessage()]
        skipped = [r for r in caplog.records if "skipping an envelope" in r.getMessage()]
        assert 1 <= len(skipped) <= len(BAD_ENVELOPES)  # rate-limited per kind of fault
        await send_json(ws, {"action": "ping"})
        await ws.close()
        await sio.close()
        raw.close()
