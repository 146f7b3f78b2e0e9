"""Refused connections: one log line each, and cheap answers for clients that keep coming back.

A refusal on ``/ws/events`` is an accept followed by a close with 4003, as the spec
promises. Browser clients (the proxy's dashboard client among them) treat the accept as a
successful connection and reset their reconnect backoff, so a client with a bad token or a
foreign origin would come back about once a second forever. After ``limit`` refusals from
one address, each within ``window_s`` of the one before, that address is answered before
the WebSocket accept (an HTTP 403), which clients count as a failed attempt: their backoff
grows. It ends once the address has had no refusal for ``window_s``.

Only connections that are refused anyway are counted or answered early: a valid token from
a busy address (thousands of dashboards behind one NAT or proxy) is never affected.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import OrderedDict

log = logging.getLogger("hub.auth")


class Answer(enum.Enum):
    CLOSE_4003 = "close_4003"  # accept, then close with 4003 (the spec's refusal)
    HTTP_403 = "http_403"  # refuse before the accept


class RefusalTracker:
    def __init__(self, limit: int, window_s: float, max_addresses: int = 10_000) -> None:
        self.limit = limit
        self.window_s = window_s
        self._max = max_addresses
        self._recent: OrderedDict[str, tuple[int, float]] = OrderedDict()  # count, last

    def refuse(self, transport: str, address: str | None, reason: str,
               user: str | None = None, *, early_answer: bool = True) -> Answer:
        """Note one refused connection and say how to answer it; logs it (a run of early
        answers to one address is logged once, when it starts). ``early_answer=False``
        for a transport that always answers the same way (Socket.IO's connect_error):
        past the limit its refusals from that address are only no longer logged."""
        now = time.monotonic()
        key = f"{transport} {address or '-'}"
        count, last = self._recent.pop(key, (0, now))
        if now - last > self.window_s:
            count = 0
        count += 1
        self._recent[key] = (count, now)
        if len(self._recent) > self._max:
            self._recent.popitem(last=False)
        who = f" (user {user})" if user else ""
        if count <= self.limit:
            log.warning("refused %s connection from %s: %s%s", transport, address or "-",
                        reason, who)
            return Answer.CLOSE_4003
        if count == self.limit + 1 and not early_answer:
            log.warning("refused %s connection from %s: %s%s; %d refusals in a row: not "
                        "logging more from this address until it has had none for %gs",
                        transport, address or "-", reason, who, self.limit, self.window_s)
        elif count == self.limit + 1:
            log.warning(
                "refused %s connection from %s: %s%s; %d refusals in a row: answering this "
                "address with HTTP 403 before the handshake until it has had none for %gs",
                transport, address or "-", reason, who, self.limit, self.window_s)
        return Answer.HTTP_403
