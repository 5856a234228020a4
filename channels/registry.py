"""Finding channels by name: every installed distribution may register one under the entry-point
group ``relais.channels`` (``email = "channels.email:EmailChannel"``), and configuration enables
them by name. A missing name or a broken plugin names itself in the error (pluggy style).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from importlib.metadata import EntryPoint, entry_points

from channels.base import Channel
from channels.errors import ChannelConfigError, ChannelLoadError, ChannelNotFoundError

GROUP = "relais.channels"
_INTERFACE = ("from_options", "send", "aclose")


def available() -> dict[str, EntryPoint]:
    """The installed channels by name."""
    found: dict[str, EntryPoint] = {}
    for entry in entry_points(group=GROUP):
        first = found.get(entry.name)
        if first is not None and first.value != entry.value:
            raise ChannelLoadError(
                f"channel {entry.name!r} is registered twice: {_origin(first)} and {_origin(entry)}"
            )
        found.setdefault(entry.name, entry)
    return found


def _origin(entry: EntryPoint) -> str:
    dist = entry.dist
    where = f" from {dist.name} {dist.version}" if dist is not None else ""
    return f"{entry.value}{where}"


def load_channel_class(name: str, entry: EntryPoint) -> type[Channel]:
    try:
        loaded = entry.load()
    except Exception as exc:  # any import-time failure of a plugin is that plugin's bug
        raise ChannelLoadError(
            f"channel {name!r} ({_origin(entry)}) failed to import: {type(exc).__name__}: {exc}"
        ) from exc
    missing = [attr for attr in _INTERFACE if not callable(getattr(loaded, attr, None))]
    if not isinstance(getattr(loaded, "name", None), str):
        missing.append("name")
    if missing:
        raise ChannelLoadError(
            f"channel {name!r} ({_origin(entry)}) is not a Channel: it lacks {', '.join(missing)}"
        )
    channel_class: type[Channel] = loaded
    return channel_class


def load_channels(
    names: Iterable[str], options_by_name: Mapping[str, Mapping[str, str]]
) -> dict[str, Channel]:
    """Build the named channels with their options, in the order given. All names are resolved
    before any channel is built, so a typo fails fast. Channels open no connection here."""
    installed = available()
    wanted = list(dict.fromkeys(names))
    unknown = [name for name in wanted if name not in installed]
    if unknown:
        raise ChannelNotFoundError(
            f"no channel named {', '.join(map(repr, unknown))} in entry-point group {GROUP}; "
            f"installed: {', '.join(sorted(installed)) or 'none'}"
        )
    channels: dict[str, Channel] = {}
    for name in wanted:
        entry = installed[name]
        channel_class = load_channel_class(name, entry)
        try:
            channels[name] = channel_class.from_options(options_by_name.get(name, {}))
        except ChannelConfigError:
            raise
        except Exception as exc:  # a plugin that cannot build itself says who it is
            raise ChannelLoadError(
                f"channel {name!r} ({_origin(entry)}) failed in from_options: {type(exc).__name__}: {exc}"
            ) from exc
    return channels
