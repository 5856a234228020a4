"""Loading channels by name through real entry points, including a third-party distribution."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from channels.base import Accepted, Channel, Message, PhoneNumber
from channels.email import EmailChannel
from channels.errors import ChannelConfigError, ChannelLoadError, ChannelNotFoundError
from channels.file_sink import FileChannel
from channels.null import NullChannel
from channels.registry import available, load_channels

PLUGIN = """
from channels.base import Accepted


class PigeonChannel:
    name = "pigeon"

    def __init__(self, loft):
        self.loft = loft

    @classmethod
    def from_options(cls, options):
        return cls(options.get("loft", "roof"))

    async def send(self, messages):
        return [Accepted(provider_message_id="coo:" + m.idempotency_key) for m in messages]

    async def aclose(self):
        return None


class NotAChannel:
    pass


class Explodes(PigeonChannel):
    @classmethod
    def from_options(cls, options):
        raise KeyError("wings")
"""


@pytest.fixture
def third_party(tmp_path: Path) -> Iterator[Path]:
    """An installed distribution on sys.path: a module and a dist-info with entry_points.txt."""
    (tmp_path / "pigeon_post.py").write_text(PLUGIN)
    (tmp_path / "broken_post.py").write_text("raise RuntimeError('half-installed')\n")
    dist_info = tmp_path / "pigeon_post-1.2.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: pigeon-post\nVersion: 1.2\n")
    (dist_info / "entry_points.txt").write_text(
        "[relais.channels]\n"
        "pigeon = pigeon_post:PigeonChannel\n"
        "broken = broken_post:Anything\n"
        "shapeless = pigeon_post:NotAChannel\n"
        "explodes = pigeon_post:Explodes\n"
    )
    sys.path.insert(0, str(tmp_path))
    try:
        yield tmp_path
    finally:
        sys.path.remove(str(tmp_path))
        for module in ("pigeon_post", "broken_post"):
            sys.modules.pop(module, None)


def test_the_builtin_channels_are_registered() -> None:
    assert {"email", "sms", "fcm", "webpush", "null", "file"} <= set(available())


def test_loads_builtin_channels_with_their_options(tmp_path: Path) -> None:
    channels = load_channels(
        ["null", "file", "email", "null"],
        {
            "file": {"dir": str(tmp_path)},
            "email": {"host": "127.0.0.1", "from": "a@b.example", "tls": "none"},
        },
    )
    assert list(channels) == ["null", "file", "email"]
    assert isinstance(channels["null"], NullChannel)
    assert isinstance(channels["file"], FileChannel)
    assert channels["file"].directory == tmp_path
    assert isinstance(channels["email"], EmailChannel)
    assert all(isinstance(channel, Channel) for channel in channels.values())


async def test_loads_a_third_party_channel_by_name(third_party: Path) -> None:
    channels = load_channels(["pigeon"], {"pigeon": {"loft": "barn"}})
    pigeon = channels["pigeon"]
    assert pigeon.name == "pigeon"
    assert vars(pigeon)["loft"] == "barn"
    result = await pigeon.send([Message("k1", PhoneNumber("+41791234567"), "", "coo")])
    assert result == [Accepted(provider_message_id="coo:k1")]


def test_unknown_name_lists_what_is_installed() -> None:
    with pytest.raises(ChannelNotFoundError, match=r"'carrier-pigeon'.*installed: .*email") as info:
        load_channels(["null", "carrier-pigeon"], {})
    assert isinstance(info.value, LookupError)


def test_broken_plugins_name_themselves(third_party: Path) -> None:
    with pytest.raises(
        ChannelLoadError, match=r"'broken' \(broken_post:Anything from pigeon-post 1.2\).*half"
    ):
        load_channels(["broken"], {})
    with pytest.raises(ChannelLoadError, match=r"'shapeless'.*lacks from_options, send, aclose, name"):
        load_channels(["shapeless"], {})
    with pytest.raises(ChannelLoadError, match=r"'explodes'.*from_options: KeyError"):
        load_channels(["explodes"], {})


def test_config_errors_pass_through_naming_the_option() -> None:
    with pytest.raises(
        ChannelConfigError, match=r"channel email: option 'host' \(RELAIS_CHANNEL_EMAIL_HOST\)"
    ):
        load_channels(["email"], {"email": {"from": "a@b.example"}})
    with pytest.raises(ChannelConfigError, match="unknown option"):
        load_channels(["null"], {"null": {"speed": "max"}})
