"""The gateway: consumes the outbox, routes, rate-limits, renders, sends, records, retries.

It never imports the engine: it reads what the engine left in Redis (notices, preferences) and
writes back outcomes, retries and dead letters in the same layout (``common/keys.py``).
"""

from gateway.worker import BatchStats, Gateway, run_gateway

__all__ = ["BatchStats", "Gateway", "run_gateway"]
