"""Errors of the shared plumbing.

RelaisError
├── SettingsError (ValueError)      a RELAIS_* / REDIS_URL variable is missing or malformed
├── RedisUnavailableError           no Redis to talk to and none can be started
└── ListenError (OSError)           the gRPC address cannot be listened on (taken, not local)
"""


class RelaisError(Exception):
    """Base of relais' own errors."""


class SettingsError(RelaisError, ValueError):
    """A setting is malformed; the message names the environment variable."""


class RedisUnavailableError(RelaisError, RuntimeError):
    """No Redis server could be reached or started."""


class ListenError(RelaisError, OSError):
    """The server cannot listen on its address; the message names it."""
