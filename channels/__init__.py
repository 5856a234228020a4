"""Channels: one adapter per way of reaching a person, found by name through the ``relais.channels``
entry points. The public surface: the interface and its values, the errors, and the registry."""

from channels.base import (
    Accepted,
    ApnsToken,
    Channel,
    Destination,
    EmailAddress,
    FcmToken,
    Message,
    PermanentFailure,
    PhoneNumber,
    SendResult,
    TransientFailure,
    WebPushSubscription,
)
from channels.errors import ChannelConfigError, ChannelError, ChannelLoadError, ChannelNotFoundError
from channels.registry import GROUP, available, load_channels

__all__ = [
    "GROUP",
    "Accepted",
    "ApnsToken",
    "Channel",
    "ChannelConfigError",
    "ChannelError",
    "ChannelLoadError",
    "ChannelNotFoundError",
    "Destination",
    "EmailAddress",
    "FcmToken",
    "Message",
    "PermanentFailure",
    "PhoneNumber",
    "SendResult",
    "TransientFailure",
    "WebPushSubscription",
    "available",
    "load_channels",
]
