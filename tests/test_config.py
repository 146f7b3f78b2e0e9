"""Settings from the environment."""

from __future__ import annotations

import pytest

from hub.config import Settings
from hub.errors import ConfigError
from tests.conftest import SECRET


def test_defaults_and_env_names() -> None:
    settings = Settings.from_env({
        "JWT_SECRET": SECRET, "REDIS_URL": "redis://r:6379/0",
        "HUB_ALLOWED_ORIGINS": "https://a.example, https://b.example",
        "HUB_HISTORY_SIZE": "20_000", "HUB_JSON_LOGS": "true",
        "HUB_EXTRA_EVENT_TYPES": "audit_log", "HUB_LEGACY_CHANNEL": "",
    })
    assert settings.backend == "redis"
    assert settings.allowed_origins == ("https://a.example", "https://b.example")
    assert settings.history_size == 20_000
    assert settings.json_logs is True
    assert settings.extra_event_types == ("audit_log",)
    assert settings.legacy_channel == ""  # empty turns the legacy channel off
    assert settings.algorithms == ("HS256",)
    assert settings.outbox_limit == 1000


def test_memory_backend_without_redis() -> None:
    assert Settings.from_env({"JWT_SECRET": SECRET}).backend == "memory"


def test_overrides_win_over_the_environment() -> None:
    settings = Settings.from_env({"JWT_SECRET": SECRET, "REDIS_URL": "redis://a"},
                                 redis_url="redis://b")
    assert settings.redis_url == "redis://b"


def test_secret_is_not_in_repr() -> None:
    assert SECRET not in repr(Settings.from_env({"JWT_SECRET": SECRET}))


@pytest.mark.parametrize("env", [
    {},
    {"JWT_SECRET": "x" * 31},
    {"JWT_SECRET": SECRET, "JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----"},
    {"JWT_PUBLIC_KEY": "-----BEGIN PUBLIC KEY-----", "JWT_ALGORITHMS": "HS256"},
    {"JWT_SECRET": SECRET, "REDIS_URL": "localhost:6379"},
    {"JWT_SECRET": SECRET, "HUB_CLIENT_RATE": "-1"},
    {"JWT_SECRET": SECRET, "HUB_JSON_LOGS": "maybe"},
    {"JWT_SECRET": SECRET, "HUB_EXTRA_EVENT_TYPES": "bad type!"},
    {"JWT_SECRET": SECRET, "HUB_MAX_CONNECTIONS": "0"},
])
def test_invalid_settings_raise_config_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigError) as caught:
        Settings.from_env(env)
    assert SECRET not in caught.value.message
