"""Prometheus metrics, one registry per app (two apps in one process keep separate counts).

With several worker processes (``hub serve --workers N``) a scrape reaches whichever worker
accepts it, so each worker must answer for all of them: the supervisor sets
``PROMETHEUS_MULTIPROC_DIR`` before the workers start, prometheus_client then keeps every
value in a per-process file there, and the registry holds a ``MultiProcessCollector`` that
sums the files of all workers (connections: of the live ones only).
"""

from __future__ import annotations

import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.multiprocess import MultiProcessCollector

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r: CollectorRegistry | None = self.registry
        if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            # Values live in the shared directory; the collector reads every worker's back.
            MultiProcessCollector(self.registry)  # type: ignore[no-untyped-call]
            r = None
        self.connections = Gauge(
            "hub_connections", "Open client connections", ["transport"], registry=r,
            multiprocess_mode="livesum")
        self.published = Counter(
            "hub_events_published", "Events accepted for publishing on this instance",
            ["type"], registry=r)
        self.delivered = Counter(
            "hub_events_delivered", "Events handed to client outboxes", ["type"], registry=r)
        self.dropped = Counter(
            "hub_events_dropped", "Events not delivered, by reason", ["reason"], registry=r)
        self.slow_consumers = Counter(
            "hub_slow_consumer_disconnects", "Clients disconnected because their outbox was full",
            ["transport"], registry=r)
        self.auth_failures = Counter(
            "hub_auth_failures", "Refused connections and requests, by reason",
            ["reason"], registry=r)
        self.redis_reconnects = Counter(
            "hub_redis_reconnects", "Times a Redis loop reconnected after losing Redis",
            registry=r)
        self.legacy = Counter(
            "hub_legacy_envelopes", "Envelopes read from the legacy Redis channel, by result "
            "(appended: this instance entered it; duplicate: another instance did; invalid: "
            "skipped; refused: Redis refused the claim, e.g. out of memory; nonconforming: a "
            "spec type whose data misses hub's schema, delivered all the same and counted "
            "besides appended/duplicate)",
            ["result"], registry=r)
        self.reader_lag = Gauge(
            "hub_redis_reader_lag_seconds",
            "Seconds since this instance's stream reader last reached the stream head",
            registry=r)
        self.round_trip = Gauge(
            "hub_redis_round_trip_seconds",
            "Last health round trip: a marker appended to the stream until read back",
            registry=r)
        self.journal_events = Gauge(
            "hub_journal_events",
            "Acknowledged events in the local outage journal, not in Redis yet", registry=r)
        self.journal_full = Counter(
            "hub_journal_refused",
            "Publishes refused (503) because the outage journal was full", registry=r)
        self.malformed_entries = Counter(
            "hub_stream_entries_malformed",
            "Stream entries that were not events (skipped by the reader and resumes)",
            registry=r)
        self.latency = Histogram(
            "hub_publish_to_send_seconds",
            "From the event's timestamp to its hand-off to the local outboxes",
            buckets=LATENCY_BUCKETS, registry=r)
        self.frame_path = Counter(
            "hub_frame_path_connections",
            "Connections by how events reach their transport: direct (pre-encoded frames "
            "written to uvicorn's transport) or asgi (ASGI sends / engine.io's queue only)",
            ["transport", "path"], registry=r)
        self.resumes = Counter(
            "hub_resumes", "Resumes by result (ok, truncated, unavailable: history unreachable "
            "after retries, refused: bad id or one already running)", ["result"], registry=r)
        self.replay_pages = Counter(
            "hub_replay_pages", "Replay pages sent, by source (window: this instance's recent "
            "events, no Redis call; backend: read from the history)", ["source"], registry=r)
        self.history_retries = Counter(
            "hub_history_retries", "History reads retried after a failure", registry=r)
        self.config_reloads = Counter(
            "hub_config_reloads", "Reloads (SIGHUP, POST /admin/reload) by result: ok, failed "
            "(the previous configuration stays)", ["result"], registry=r)
        self.jwks_fetches = Counter(
            "hub_jwks_fetches", "JWT_JWKS_URL fetches by result: ok, failed (cached keys stay)",
            ["result"], registry=r)
        # Durable consumers (hub.consumers), set at each scrape from the cursor store. Lag
        # counts the events after a consumer's cursor (of every type), as far as this
        # instance's replay window tells (beyond it: at least the window's size).
        self.consumers = Gauge(
            "hub_consumers", "Durable consumers kept (GET /consumers)", registry=r,
            multiprocess_mode="max")
        self.consumer_lag = Gauge(
            "hub_consumer_lag_events", "Events after the cursor of the consumers of this "
            "name (the largest over their users), for the 20 names that lag most",
            ["consumer"], registry=r, multiprocess_mode="max")
        self.consumer_lag_max = Gauge(
            "hub_consumer_lag_events_max", "Events after the cursor of the consumer that "
            "lags most", registry=r, multiprocess_mode="max")
        self.consumer_lag_seconds_max = Gauge(
            "hub_consumer_lag_seconds_max", "Seconds between the cursor of the consumer that "
            "lags most and the newest event", registry=r, multiprocess_mode="max")
        self.consumer_acks = Counter(
            "hub_consumer_acks_stored", "Consumer cursor writes (acks, coalesced per "
            "connection) stored", registry=r)
        self.consumer_write_failures = Counter(
            "hub_consumer_write_failures", "Consumer cursor writes that failed (retried)",
            registry=r)
        for transport in ("websocket", "socketio"):
            # Export zeros from the start, so dashboards show 0 rather than "no data".
            self.connections.labels(transport)
            self.slow_consumers.labels(transport)

    def render(self) -> bytes:
        return generate_latest(self.registry)
