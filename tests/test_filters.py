"""hub.dispatch.filters, the pure filter module: property tests (hypothesis) of what every
transport relies on (a filter only narrows, the JSON and query forms are one filter,
severities follow each type's order) and the refusals of malformed filters."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hub.dispatch.filters import (
    SEVERITY_ORDERS,
    SEVERITY_RANKS,
    EventFilter,
    parse_filter,
    parse_query,
)
from hub.errors import ErrorCode, ProtocolError
from hub.events import Event

TYPES = ("threat_detected", "cost_threshold_alert", "provider_health_change", "system_status")
SEVERITIES = sorted(SEVERITY_RANKS)
PROVIDERS = ("openai", "azure", "anthropic", "local")

scalar = st.one_of(st.sampled_from(PROVIDERS), st.integers(-3, 3), st.booleans())


@st.composite
def events(draw: st.DrawFn) -> Event:
    type_ = draw(st.sampled_from(TYPES))
    data: dict[str, Any] = {}
    if draw(st.booleans()):
        data["severity"] = draw(st.sampled_from([*SEVERITIES, "bogus"]))
    if draw(st.booleans()):
        data["provider"] = draw(st.one_of(scalar, st.lists(scalar, max_size=2)))
    if draw(st.booleans()):
        data["count"] = draw(st.integers(-3, 3))
    n = draw(st.integers(0, 10_000))
    return Event(id=f"1700000000000-{n}", type=type_, timestamp="2026-01-01T00:00:00Z",
                 data=data)


filter_specs = st.fixed_dictionaries({}, optional={
    "min_severity": st.sampled_from(SEVERITIES),
    "provider": st.lists(st.sampled_from(PROVIDERS), min_size=1, max_size=3),
    "count": st.lists(st.integers(-3, 3), min_size=1, max_size=3),
})


def matching(flt: EventFilter | None, batch: list[Event]) -> list[Event]:
    return [e for e in batch if flt is None or flt.matches(e)]


@given(filter_specs, st.lists(events(), max_size=30))
@settings(deadline=None)  # no timing threshold: a loaded machine stalls any example
def test_a_filter_only_narrows_and_each_key_narrows_further(spec: dict[str, Any],
                                                            batch: list[Event]) -> None:
    flt = parse_filter(spec)
    kept = matching(flt, batch)
    assert all(e in batch for e in kept)
    for key in spec:  # dropping any key lets at least as much through
        looser = parse_filter({k: v for k, v in spec.items() if k != key})
        assert set(map(id, kept)) <= set(map(id, matching(looser, batch)))


@given(filter_specs)
@settings(deadline=None)
def test_the_json_and_query_forms_are_one_filter(spec: dict[str, Any]) -> None:
    flt = parse_filter(spec)
    query = [("min_severity", v) if k == "min_severity" else
             (f"data.{k}", ",".join(str(x).lower() if isinstance(x, bool) else str(x)
                                    for x in v))
             for k, v in spec.items()]
    assert parse_query(query) == flt
    if flt is not None:
        assert parse_query(flt.query()) == flt
        assert parse_filter(flt.describe()) == flt


@given(st.sampled_from(SEVERITIES), st.sampled_from(SEVERITIES), st.lists(events(), max_size=30))
@settings(deadline=None)
def test_a_higher_min_severity_keeps_a_subset(low: str, high: str, batch: list[Event]) -> None:
    if SEVERITY_RANKS[low] > SEVERITY_RANKS[high]:
        low, high = high, low
    kept_low = matching(parse_filter({"min_severity": low}), batch)
    kept_high = matching(parse_filter({"min_severity": high}), batch)
    assert set(map(id, kept_high)) <= set(map(id, kept_low))


@given(st.sampled_from(SEVERITIES), events())
@settings(deadline=None)
def test_min_severity_follows_each_types_order(threshold: str, event: Event) -> None:
    passed = parse_filter({"min_severity": threshold}).matches(event)  # type: ignore[union-attr]
    order = SEVERITY_ORDERS.get(event.type)
    if order is None:  # no severity order: min_severity does not apply
        assert passed
        return
    severity = event.data.get("severity")
    if severity not in order:  # a type with an order but no valid severity: out
        assert not passed
        return
    assert passed == (order.index(severity) + 1 >= SEVERITY_RANKS[threshold])


def test_severity_orders_by_example() -> None:
    def sev(type_: str, severity: str) -> Event:
        return Event(id="1-0", type=type_, timestamp="t", data={"severity": severity})
    high = parse_filter({"min_severity": "high"})
    assert high is not None
    assert [high.matches(sev("threat_detected", s))
            for s in ("low", "medium", "high", "critical")] == [False, False, True, True]
    # "high" ranks where "error" does among alerts
    assert [high.matches(sev("cost_threshold_alert", s))
            for s in ("info", "warning", "error", "critical")] == [False, False, True, True]
    warning = parse_filter({"min_severity": "warning"})
    assert warning is not None and warning.matches(sev("threat_detected", "medium"))
    assert not warning.matches(sev("threat_detected", "low"))


def test_field_values_match_any_of_them_and_every_key_must_match() -> None:
    flt = parse_query([("data.provider", "openai,azure"), ("data.region", "eu")])
    assert flt is not None

    def ev(**data: Any) -> Event:
        return Event(id="1-0", type="provider_health_change", timestamp="t", data=data)
    assert flt.matches(ev(provider="azure", region="eu"))
    assert not flt.matches(ev(provider="azure"))
    assert not flt.matches(ev(provider="gcp", region="eu"))
    assert not flt.matches(ev(provider=["azure"], region="eu"))  # lists never match
    counted = parse_query([("data.count", "3"), ("data.ok", "true")])
    assert counted is not None and counted.matches(ev(count=3, ok=True))
    assert not counted.matches(ev(count=4, ok=True))


@pytest.mark.parametrize("bad", [
    "high", [], {"min_severity": "severe"}, {"min_severity": 3}, {"provider": []},
    {"provider": {"a": 1}}, {"provider": [None]}, {"provider": [["x"]]}, {"": ["x"]},
    {"x" * 65: ["y"]}, {"provider": ["x" * 257]}, {f"k{i}": ["v"] for i in range(17)},
    {"provider": [str(i) for i in range(65)]},
])
def test_malformed_filters_are_invalid_filter(bad: Any) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_filter(bad)
    assert caught.value.code == ErrorCode.INVALID_FILTER


@pytest.mark.parametrize("bad", [
    [("min_severity", "nope")], [("data.", "x")], [("data.provider", "")],
    [("data.provider", "a,,b")], [("data.p", ",".join(str(i) for i in range(65)))],
])
def test_malformed_query_filters_are_invalid_filter(bad: list[tuple[str, str]]) -> None:
    with pytest.raises(ProtocolError) as caught:
        parse_query(bad)
    assert caught.value.code == ErrorCode.INVALID_FILTER


@settings(max_examples=300, deadline=None)
@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=5),
                    lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=8))
def test_any_json_either_parses_or_is_invalid_filter(value: Any) -> None:
    try:
        parse_filter(value)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.INVALID_FILTER


def test_no_filter_and_an_empty_one_are_none() -> None:
    assert parse_filter(None) is None and parse_filter({}) is None
    assert parse_query([("types", "a"), ("limit", "3")]) is None
