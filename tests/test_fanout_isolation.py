"""One recipient whose send raises does not cost anyone else the event, nor the publisher
its answer: the failure is counted, logged once, and that connection closed."""

from __future__ import annotations

import logging
from typing import Any

import httpx
import pytest

from hub.auth import Principal
from hub.connection import Subscriber
from hub.events import Event
from tests.conftest import RunningHub, make_token
from tests.helpers import THREAT, connected, recv_type
from tests.sio_helpers import SioClient


class BrokenConnection(Subscriber):
    """A connection whose transport write raises (as a library internal that changed
    would: the old ``packet_backlog`` AttributeError)."""

    transport = "broken"

    def __init__(self) -> None:
        super().__init__(Principal(user_id="broken", roles=frozenset({"viewer"}),
                                   tenant=None, expires_at=None, is_admin=False,
                                   can_publish=False))
        self.sends = 0
        self.closed_after_error = 0

    def _send(self, event: Event, replay: bool = False) -> None:
        self.sends += 1
        raise AttributeError("'AsyncSocket' object has no attribute 'packet_backlog'")

    def send_control(self, name: str, data: dict[str, Any]) -> None:
        pass

    def close_after_error(self) -> None:
        self.closed_after_error += 1


@pytest.mark.parametrize("position", ["first", "last"])
async def test_a_failing_send_is_isolated(memory_hub: RunningHub, position: str,
                                          caplog: pytest.LogCaptureFixture) -> None:
    hub = memory_hub.hub
    broken = BrokenConnection()
    if position == "first":
        hub.dispatcher.add(broken)
    ws = await connected(memory_hub.ws_url, make_token("plain"))
    sio = SioClient()
    await sio.connect(memory_hub.url, auth={"token": make_token("sio")})
    if position == "last":
        hub.dispatcher.add(broken)
    admin = make_token("publisher", role="admin")
    caplog.set_level(logging.ERROR, logger="hub.dispatch")
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {admin}"}) as http:
        statuses = []
        for n in range(3):
            response = await http.post(f"{memory_hub.url}/events", json={
                "type": "threat_detected", "data": {**THREAT, "n": n}})
            statuses.append(response.status_code)
    assert statuses == [202, 202, 202]  # the next POST on the connection too
    assert [(await recv_type(ws, "threat_detected"))["data"]["n"] for _ in range(3)] == \
        [0, 1, 2]
    assert [(await sio.next_event("threat_detected"))["data"]["n"] for _ in range(3)] == \
        [0, 1, 2]
    assert broken.sends == 1 and broken.closed_after_error == 1
    assert all(broken not in members for members in hub.dispatcher.rooms.values())
    assert hub.metrics.dropped.labels("send_error")._value.get() == 1
    failures = [r for r in caplog.records if "failed; closing it" in r.getMessage()]
    assert len(failures) == 1
    await ws.close()
    await sio.close()
