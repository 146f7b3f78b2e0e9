"""The printed table."""

from __future__ import annotations

from typing import Any


def _f(v: Any, fmt: str = "{:.0f}") -> str:
    return "-" if v is None else fmt.format(v)


def table(results: list[dict[str, Any]]) -> str:
    lines: list[str] = []
    delivery = [
        r for r in results if r["scenario"] not in ("capacity", "multicore", "revocation")
    ]
    capacity = [r for r in results if r["scenario"] == "capacity"]
    if delivery:
        head: tuple[str, ...] = (
            "scenario",
            "target",
            "clients",
            "events",
            "delivered/expected",
            "all?",
            "cpu µs/deliv",
            "deliv/s",
            "p50 ms",
            "p99 ms",
            "max ms",
            "redis µs/ev",
            "other cpu %",
        )
        rows: list[tuple[str, ...]] = [head]
        for r in delivery:
            if "error" in r:
                cells = (r["scenario"], r["target"], "", "", r["error"][:60], "ERROR")
                rows.append(cells + ("",) * (len(head) - len(cells)))
                continue
            lat = r["latency_ms"]
            events = r["events"] or 1
            rows.append(
                (
                    r["scenario"] + (f" x{r['instances']}" if r.get("instances", 1) > 1 else ""),
                    r["target"],
                    str(r["connected"]),
                    str(r["events"]),
                    f"{r['delivered']}/{r['expected']}"
                    + (f" dup={r['duplicates']}" if r["duplicates"] else ""),
                    "yes" if r["complete"] else "NO",
                    _f(r["cpu_us_per_delivery"], "{:.1f}"),
                    _f(r["deliveries_per_s"]),
                    _f(lat["p50"], "{:.1f}"),
                    _f(lat["p99"], "{:.1f}"),
                    _f(lat["max"], "{:.1f}"),
                    _f(r["redis_cpu_s"] / events * 1e6),
                    _f(r.get("other_cpu_pct")),
                )
            )
        lines += _grid(rows)
        busy = [r for r in delivery if (r.get("other_cpu_pct") or 0) > 25]
        if busy:
            lines.append(
                "warning: other processes used the CPU during "
                + ", ".join(f"{r['scenario']}/{r['target']}" for r in busy)
                + " ('other cpu %'): their latency and throughput are not trustworthy"
            )
    if capacity:
        if lines:
            lines.append("")
        head = (
            "capacity",
            "target",
            "connections",
            "all open?",
            "connect/s",
            "RSS before MB",
            "RSS after MB",
            "KiB/conn",
            "idle cpu %",
        )
        rows = [head]
        for r in capacity:
            if "error" in r:
                rows.append(("idle", r["target"], "", "ERROR", r["error"][:60], "", "", "", ""))
                continue
            rows.append(
                (
                    "idle",
                    r["target"],
                    f"{r['connected']}/{r['clients']}",
                    "yes" if r["complete"] else "NO",
                    _f(r["connects_per_s"]),
                    _f(r["rss_mb_before"], "{:.1f}"),
                    _f(r["rss_mb_after"], "{:.1f}"),
                    _f(r["rss_kib_per_conn"], "{:.1f}"),
                    _f(r["idle_cpu_pct"], "{:.1f}"),
                )
            )
        lines += _grid(rows)
        # Side by side, the figure issue 16 asks for: idle memory per connection per target.
        for n in sorted({r["clients"] for r in capacity if "error" not in r}):
            side = [
                f"{r['target']} {_f(r['rss_kib_per_conn'], '{:.1f}')} KiB"
                for r in capacity
                if r.get("clients") == n and "error" not in r
            ]
            lines.append(f"idle memory per connection at {n:,}: " + ", ".join(side))
    concurrent = [r for r in delivery if r["scenario"] == "concurrent" and "error" not in r]
    if concurrent:
        lines.append(
            "concurrent on one instance: "
            + ", ".join(
                f"{r['target']} {r['connected']:,}/{r['clients']:,} open, "
                + ("every one got the event" if r["complete"] else "NOT every one got it")
                + f" ({_f(r.get('rss_kib_per_conn'), '{:.1f}')} KiB/conn)"
                for r in concurrent
            )
        )
    multicore = [r for r in results if r["scenario"] == "multicore"]
    if multicore:
        if lines:
            lines.append("")
        lines += multicore_table(multicore)
    revoked = [r for r in results if r["scenario"] == "revocation"]
    if revoked:
        from bench.revocation import table as revocation_table

        if lines:
            lines.append("")
        lines += revocation_table(revoked)
    return "\n".join(lines)


def multicore_table(results: list[dict[str, Any]]) -> list[str]:
    """One process against two: each process's share of the clients, CPU per delivery."""
    head = (
        "multicore",
        "target",
        "clients",
        "delivered/expected",
        "all?",
        "clients per process %",
        "even?",
        "cpu µs/deliv",
        "vs 1 process",
        "deliv/write",
        "p50 ms",
        "p99 ms",
        "other cpu %",
    )
    rows: list[tuple[str, ...]] = [head]
    for r in results:
        if "error" in r:
            cells = ("", r["target"], "", r["error"][:60], "ERROR")
            rows.append(cells + ("",) * (len(head) - len(cells)))
            continue
        shares = r.get("worker_share_pct") or []
        even = r.get("spread_even")
        rows.append(
            (
                r["layout"],
                r["target"],
                str(r["connected"]),
                f"{r['delivered']}/{r['expected']}"
                + (f" dup={r['duplicates']}" if r["duplicates"] else ""),
                "yes" if r["complete"] else "NO",
                " / ".join(f"{s:.1f}" for s in shares) or "-",
                "-" if even is None else "yes" if even else "NO",
                _f(r["cpu_us_per_delivery"], "{:.1f}"),
                _f(r.get("cpu_vs_one_process"), "{:.2f}"),
                _f(r.get("deliveries_per_write"), "{:.2f}"),
                _f(r["latency_ms"]["p50"], "{:.1f}"),
                _f(r["latency_ms"]["p99"], "{:.1f}"),
                _f(r.get("other_cpu_pct")),
            )
        )
    return _grid(rows)


def _grid(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for n, r in enumerate(rows):
        cells = zip(r, widths, strict=True)
        out.append("  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(cells)))
        if n == 0:
            out.append("  ".join("-" * w for w in widths))
    return out
