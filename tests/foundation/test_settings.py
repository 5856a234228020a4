"""Settings are read once from the environment and a bad value names its variable."""

from __future__ import annotations

import pytest

from common.errors import SettingsError
from common.settings import Settings


def test_defaults_listen_on_loopback() -> None:
    settings = Settings.from_env({})
    assert settings.listen == "127.0.0.1:50051"
    assert settings.redis_url is None
    assert settings.retention_days == 30


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"RELAIS_LISTEN": "50051"}, "RELAIS_LISTEN"),
        ({"RELAIS_LISTEN": "localhost:http"}, "RELAIS_LISTEN"),
        ({"RELAIS_SHARDS": "many"}, "RELAIS_SHARDS"),
        ({"RELAIS_SHARDS": "0"}, "RELAIS_SHARDS"),
        ({"RELAIS_GRACE_S": "-1"}, "RELAIS_GRACE_S"),
        ({"RELAIS_RUN_GATEWAY": "perhaps"}, "RELAIS_RUN_GATEWAY"),
        ({"REDIS_URL": "localhost:6379"}, "REDIS_URL"),
        ({"RELAIS_LOG_LEVEL": "LOUD"}, "RELAIS_LOG_LEVEL"),
        ({"RELAIS_CHANNEL_EMAIL": "x"}, "RELAIS_CHANNEL_EMAIL"),
        ({"RELAIS_GATEWAY_LINK_BASE": "http://track.example"}, "RELAIS_GATEWAY_LINK_BASE"),
        ({"RELAIS_GATEWAY_TEMPLATES_DIR": "/nonexistent/templates"}, "RELAIS_GATEWAY_TEMPLATES_DIR"),
        ({"RELAIS_GATEWAY_SEND_TIMEOUT_S": "0.5"}, "RELAIS_GATEWAY_SEND_TIMEOUT_S"),
        ({"RELAIS_SCHEDULER_MAX_IDLE_S": "0"}, "RELAIS_SCHEDULER_MAX_IDLE_S"),
        ({"RELAIS_SCHEDULER_MAX_IDLE_S": "soon"}, "RELAIS_SCHEDULER_MAX_IDLE_S"),
        ({"RELAIS_SCHEDULER_TIMER_CONCURRENCY": "0"}, "RELAIS_SCHEDULER_TIMER_CONCURRENCY"),
        ({"RELAIS_SCHEDULER_TIMER_CONCURRENCY": "2.5"}, "RELAIS_SCHEDULER_TIMER_CONCURRENCY"),
        ({"RELAIS_SCHEDULER_TIMER_TIMEOUT_S": "-1"}, "RELAIS_SCHEDULER_TIMER_TIMEOUT_S"),
        ({"RELAIS_SCHEDULER_TIMER_RETRY_MS": "0"}, "RELAIS_SCHEDULER_TIMER_RETRY_MS"),
    ],
)
def test_bad_value_names_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(SettingsError, match=named):
        Settings.from_env(env)


def test_scheduler_settings_are_read_from_their_variables() -> None:
    scheduler = Settings.from_env(
        {
            "RELAIS_SCHEDULER_MAX_IDLE_S": "5",
            "RELAIS_SCHEDULER_TIMER_CONCURRENCY": "8",
            "RELAIS_SCHEDULER_TIMER_TIMEOUT_S": "2.5",
            "RELAIS_SCHEDULER_TIMER_RETRY_MS": "60000",
        }
    ).scheduler
    assert (scheduler.max_idle_s, scheduler.timer_concurrency) == (5.0, 8)
    assert (scheduler.timer_timeout_s, scheduler.timer_retry_ms) == (2.5, 60_000)


def test_channel_options_are_grouped_by_channel() -> None:
    settings = Settings.from_env(
        {"RELAIS_CHANNEL_EMAIL_HOST": "smtp.local", "RELAIS_CHANNEL_EMAIL_PORT": "25"}
    )
    assert settings.channel_options == {"email": {"host": "smtp.local", "port": "25"}}


def test_merchants_allowed_links_for_unpaid_orders() -> None:
    settings = Settings.from_env({"RELAIS_ENGINE_UNPAID_ACTIONABLE_MERCHANTS": "acme, globex,"})
    assert settings.engine.unpaid_actionable_merchants == frozenset({"acme", "globex"})


def test_an_empty_channels_variable_names_no_channel() -> None:
    """A template with nothing filled in (``RELAIS_CHANNELS=``) must not pass for a choice of channels."""
    assert not Settings.from_env({}).channels_named
    assert not Settings.from_env({"RELAIS_CHANNELS": ""}).channels_named
    named = Settings.from_env({"RELAIS_CHANNELS": "email,fcm"})
    assert named.channels_named
    assert named.channels == ("email", "fcm")
