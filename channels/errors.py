"""Errors of the channel layer.

A message that cannot be delivered is not an error: ``send`` returns a ``TransientFailure`` or a
``PermanentFailure`` for it. These exceptions are for the operator: a channel that cannot be built
or found. Third-party exceptions (aiosmtplib, httpx, cryptography) are translated where they are
caught, at the edge of each channel module, and never escape ``send``.

ChannelError
├── ChannelConfigError (ValueError)     an option is missing or malformed; the message names it
├── ChannelNotFoundError (LookupError)  no plugin of that name in the ``relais.channels`` group
└── ChannelLoadError (ImportError)      a plugin exists but failed to import or is not a Channel
"""

from __future__ import annotations


class ChannelError(Exception):
    """Base of the channel layer's errors."""


class ChannelConfigError(ChannelError, ValueError):
    """An option is missing or malformed. The message names the channel, the option and its
    environment variable, never the option's value when it may be secret."""


class ChannelNotFoundError(ChannelError, LookupError):
    """No entry point of that name in the ``relais.channels`` group; the message lists the known ones."""


class ChannelLoadError(ChannelError, ImportError):
    """A plugin was found but is broken; the message names the entry point and its distribution."""
