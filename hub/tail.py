"""``hub tail``: a live terminal view of a hub's events, built on :mod:`hub.client`.

Events go to stdout, one line each (or one JSON envelope per line with ``--json``, for
``jq``); what happens to the connection goes to stderr, so a pipe only ever sees events.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import sys
from typing import Any, NoReturn, TextIO

import orjson

from hub.client import Notice, NoticeKind, TokenSource, subscribe, token_file
from hub.consumers import check_name
from hub.errors import AuthenticationFailed, ConnectionLost, ProtocolError, SubscriptionRefused
from hub.events import Event, is_event_id

DEFAULT_URL = "http://127.0.0.1:8000"

RESET = "\033[0m"
DIM = "\033[2m"
BOLD = "\033[1m"
TYPE_COLOURS = {
    "threat_detected": "\033[35m",  # magenta
    "provider_health_change": "\033[36m",  # cyan
    "cost_threshold_alert": "\033[33m",  # yellow
    "system_status": "\033[34m",  # blue
}
LEVEL_COLOURS = {
    "critical": "\033[1;41;97m",  # white on red
    "high": "\033[1;31m",
    "error": "\033[1;31m",
    "unhealthy": "\033[1;31m",
    "medium": "\033[33m",
    "warning": "\033[33m",
    "degraded": "\033[33m",
    "shutdown": "\033[33m",
    "low": "\033[32m",
    "info": "\033[32m",
    "healthy": "\033[32m",
    "online": "\033[32m",
}


# What a terminal would act on rather than show: C0 controls (ESC, CR, BS, BEL…), DEL, C1
# controls (U+009B is a one-character CSI), and the line/paragraph separators and bidi
# overrides that reorder or break what is displayed around them.
_UNSAFE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def printable(text: object) -> str:
    """``text`` with every control character shown as an escape (``\\x1b``, ``\\x9b``):
    event data is untrusted, and a raw OSC or CSI sequence would retitle the window, write
    the clipboard or overwrite earlier lines."""
    return _UNSAFE.sub(_escape, str(text))


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"


def json_line(envelope: object) -> str:
    """One JSON document with no raw control character in it: orjson escapes C0 already;
    DEL, C1 and the separators/bidi controls become ``\\uXXXX`` (inside JSON they can only
    be in strings, where the escape means the same character)."""
    return _UNSAFE.sub(_json_escape, orjson.dumps(envelope).decode())


def level(event: Event) -> str:
    """The one word that says how bad an event is: its severity, or the new status."""
    data = event.data
    for key in ("severity", "new_status", "status"):
        value = data.get(key)
        if isinstance(value, str) and value:
            return value
    return ""


def summary(event: Event) -> str:
    """A one-line human summary of an event's data."""
    d = event.data
    if event.type == "threat_detected":
        confidence = d.get("confidence")
        pct = f" ({confidence:.0%})" if isinstance(confidence, int | float) else ""
        return f"{d.get('attack_type', '?')} {d.get('action_taken', '')}{pct}".strip()
    if event.type == "provider_health_change":
        return f"{d.get('provider', '?')}: {d.get('old_status', '?')} → {d.get('new_status', '?')}"
    if event.type == "cost_threshold_alert":
        text = str(d.get("message", ""))
        if d.get("current_cost") is not None and d.get("threshold") is not None:
            text += f" ({d['current_cost']}/{d['threshold']})"
        return text
    if event.type == "system_status":
        return " ".join(str(x) for x in (d.get("instance_id"), d.get("message")) if x)
    return orjson.dumps(d).decode()[:160]


def format_line(event: Event, colour: bool) -> str:
    """``HH:MM:SS.mmm  type  LEVEL  summary  id`` — coloured by type and severity. Every
    field is passed through :func:`printable`, colour or not."""
    clock = printable(event.timestamp[11:23] if len(event.timestamp) >= 23 else event.timestamp)
    raw_level = level(event)
    lvl = printable(raw_level.upper())
    name = printable(event.type)
    text = printable(summary(event))
    ident = printable(event.id)
    tenant = f" [tenant {printable(event.tenant)}]" if event.tenant else ""
    if not colour:
        return f"{clock}  {name:<22} {lvl:<9} {text}{tenant}  {ident}"
    type_colour = TYPE_COLOURS.get(event.type, BOLD)
    lvl_text = f"{LEVEL_COLOURS.get(raw_level, '')}{lvl:<9}{RESET}" if lvl else " " * 9
    return (f"{DIM}{clock}{RESET}  {type_colour}{name:<22}{RESET} {lvl_text} "
            f"{text}{tenant}  {DIM}{ident}{RESET}")


def use_colour(stream: TextIO, mode: str) -> bool:
    if mode == "always":
        return True
    if mode == "never" or os.environ.get("NO_COLOR"):
        return False
    return stream.isatty()


def _parse_types(value: str) -> list[str]:
    types = [t.strip() for t in value.split(",") if t.strip()]
    if not types:
        raise argparse.ArgumentTypeError("--types needs at least one event type")
    return types


def _parse_since(value: str) -> str:
    if not is_event_id(value):
        raise argparse.ArgumentTypeError(f"--since takes an event id like 1700000000000-0, "
                                         f"got {value!r}")
    return value


def _parse_consumer(value: str) -> str:
    try:
        return check_name(value)
    except ProtocolError as exc:
        raise argparse.ArgumentTypeError(f"--consumer: {exc.message}") from None


def add_parser(subparsers: Any) -> None:
    """Add the ``tail`` sub-command to ``hub``'s argument parser."""
    tail = subparsers.add_parser(
        "tail", help="show a hub's events live in the terminal",
        description="Show a hub's events live; reconnects and resumes by itself.")
    tail.add_argument("--url", default=DEFAULT_URL, help=f"the hub (default {DEFAULT_URL})")
    tail.add_argument("--token", help="bearer token (default: env HUB_TOKEN)")
    tail.add_argument("--token-file", metavar="PATH",
                      help="read the token from this file, re-read to refresh in-band when "
                           "the hub says token_expiring and at each reconnect")
    tail.add_argument("--types", type=_parse_types, action="extend",
                      help="comma-separated event types (default: all)")
    tail.add_argument("--since", type=_parse_since, metavar="ID",
                      help="first show the retained events after this event id")
    tail.add_argument("--consumer", metavar="NAME", type=_parse_consumer,
                      help="a durable consumer: the hub keeps its cursor; each event is "
                           "acknowledged once printed, and a restarted tail goes on after "
                           "the last one acknowledged")
    tail.add_argument("--min-severity", metavar="LEVEL",
                      help="server-side filter: events of at least this severity "
                           "(threats low|medium|high|critical, alerts "
                           "info|warning|error|critical)")
    tail.add_argument("--json", action="store_true",
                      help="one JSON envelope per line on stdout (for jq)")
    tail.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                      help="colour the lines (default: when stdout is a terminal)")
    tail.add_argument("--retry-for", type=float, metavar="SECONDS",
                      help="give up after this long without a connection (default: never)")
    tail.set_defaults(func=run)


def _fail(message: str, code: int = 1) -> NoReturn:
    print(f"hub: error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


def run(args: argparse.Namespace) -> None:
    token: TokenSource | None = args.token or os.environ.get("HUB_TOKEN")
    if args.token_file:
        if args.token:
            _fail("--token and --token-file exclude each other", 2)
        source = token_file(args.token_file)
        try:
            if not source():
                _fail(f"--token-file {args.token_file}: the file is empty", 2)
        except OSError as exc:
            _fail(f"--token-file {args.token_file}: {exc.strerror}", 2)
        token = source
    if not token:
        _fail("no token: pass --token or set HUB_TOKEN (e.g. from `hub token --sub me`), "
              "or --token-file", 2)
    try:
        asyncio.run(_tail(args, token))
    except AuthenticationFailed as exc:
        _fail(f"{exc.message} (close 4003); get a fresh token and check JWT_SECRET / "
              f"JWT_ISSUER / JWT_AUDIENCE")
    except SubscriptionRefused as exc:
        _fail(f"the hub refused the subscription: {exc.message}", 2)
    except ConnectionLost as exc:
        _fail(exc.message)
    except ValueError as exc:
        _fail(str(exc), 2)
    except BrokenPipeError:
        # The reader went away (`hub tail | head`): stop quietly.
        sys.stderr.close()
        os._exit(0)


async def _tail(args: argparse.Namespace, token: TokenSource) -> None:
    out = sys.stdout
    colour = not args.json and use_colour(out, args.color)
    err_colour = use_colour(sys.stderr, args.color)

    def on_notice(notice: Notice) -> None:
        text = f"hub tail: {printable(notice.message)}"
        if err_colour and notice.kind in (NoticeKind.DISCONNECTED, NoticeKind.HISTORY_TRUNCATED,
                                          NoticeKind.ERROR):
            text = f"\033[33m{text}{RESET}"
        elif err_colour:
            text = f"{DIM}{text}{RESET}"
        print(text, file=sys.stderr, flush=True)

    flt = {"min_severity": args.min_severity} if args.min_severity else None
    async with subscribe(args.url, token, types=args.types, last_event_id=args.since,
                         retry_for=args.retry_for, on_notice=on_notice,
                         consumer=args.consumer, filter=flt) as events:
        async for event in events:
            line = json_line(event.envelope()) if args.json else format_line(event, colour)
            out.write(line + "\n")
            out.flush()
