"""Typed reading of a channel's options, with errors that name the option.

Options arrive as strings (``RELAIS_CHANNEL_<NAME>_<OPTION>`` variables, lower-cased, prefix
removed). Each channel reads them through one ``Options`` and calls ``finish()`` last, so a
misspelt option is reported instead of silently ignored.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from channels.errors import ChannelConfigError

N = TypeVar("N", int, float)


class Options:
    def __init__(self, channel: str, raw: Mapping[str, str]) -> None:
        self.channel = channel
        self._raw = dict(raw)
        self._read: set[str] = set()

    def _where(self, option: str) -> str:
        variable = f"RELAIS_CHANNEL_{self.channel.upper()}_{option.upper()}"
        return f"channel {self.channel}: option {option!r} ({variable})"

    def error(self, option: str, problem: str) -> ChannelConfigError:
        return ChannelConfigError(f"{self._where(option)} {problem}")

    def _get(self, option: str) -> str | None:
        self._read.add(option)
        value = self._raw.get(option)
        return None if value is None or value.strip() == "" else value.strip()

    def text(self, option: str, default: str = "") -> str:
        value = self._get(option)
        return default if value is None else value

    def required(self, option: str) -> str:
        value = self._get(option)
        if value is None:
            raise self.error(option, "is required")
        return value

    def integer(self, option: str, default: int, *, low: int, high: int) -> int:
        return self._ranged(option, default, int, "a whole number", low, high)

    def number(self, option: str, default: float, *, low: float, high: float) -> float:
        return self._ranged(option, default, float, "a number", low, high)

    def _ranged(self, option: str, default: N, parse: Callable[[str], N], kind: str, low: N, high: N) -> N:
        value = self._get(option)
        if value is None:
            return default
        try:
            parsed = parse(value)
        except ValueError:
            raise self.error(option, f"={value!r} is not {kind}") from None
        if not low <= parsed <= high:
            raise self.error(option, f"={parsed} is out of range ({low} to {high})")
        return parsed

    def flag(self, option: str, default: bool) -> bool:
        value = self._get(option)
        if value is None:
            return default
        lowered = value.lower()
        if lowered in {"1", "true", "yes", "on"}:
            return True
        if lowered in {"0", "false", "no", "off"}:
            return False
        raise self.error(option, f"={value!r} is not a boolean (use true or false)")

    def choice(self, option: str, default: str, choices: tuple[str, ...]) -> str:
        value = self.text(option, default).lower()
        if value not in choices:
            raise self.error(option, f"={value!r} is not one of {', '.join(choices)}")
        return value

    def file(self, option: str, *, required: bool = False) -> Path | None:
        value = self.required(option) if required else self._get(option)
        if value is None:
            return None
        path = Path(value)
        if not path.is_file():
            raise self.error(option, f"names no readable file ({path})")
        return path

    def finish(self) -> None:
        """Reject options the channel does not know: a typo must not silently fall back to a default."""
        unknown = sorted(set(self._raw) - self._read)
        if unknown:
            raise ChannelConfigError(
                f"channel {self.channel}: unknown option(s) {', '.join(unknown)}; "
                f"known: {', '.join(sorted(self._read))}"
            )
