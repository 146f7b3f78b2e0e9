"""Every reach into a third-party library's internals, in one place.

hub relies on a few things uvicorn, python-engineio and python-socketio do not promise as
public API: the sans-I/O WebSocket protocol behind uvicorn's ``send`` (for direct frame
writes), engine.io's per-socket send queue and upgrade flags (for encode-once fan-out
and the polling→WebSocket switch-over), and the order in which python-socketio queues a
CONNECT packet and registers the socket. Each assumption is a small function here, and
``tests/test_compat.py`` asserts each one against the installed release, failing with a
message that names the library and version. The version ranges in ``pyproject.toml`` are
the ones those tests pass on (a test runs them on the lowest allowed versions too).
"""

from __future__ import annotations

from importlib import metadata


def version(distribution: str) -> str:
    """The installed version of ``distribution`` (for messages naming what broke)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:  # pragma: no cover - a vendored or odd install
        return "unknown"


class CompatError(AssertionError):
    """An internal hub relies on is not what it expects in the installed release."""

    def __init__(self, distribution: str, assumption: str) -> None:
        super().__init__(f"{distribution} {version(distribution)}: {assumption} "
                         "(hub's hub/_compat seam; see the supported ranges in pyproject.toml)")
