"""The load test's recipients: preferences set before the first parcel is registered.

Through the PreferenceService (``UpdatePreferences``, many calls in flight), as a merchant's account
page would. While an engine does not serve that service yet, the same protobuf goes straight to the
key the service writes (``keys.preferences``), and the run says which way it went.
"""

from __future__ import annotations

import asyncio

import grpc
from redis.asyncio import Redis
from relais.v1 import preferences_pb2, preferences_pb2_grpc

from common import keys
from loadtest.journeys import LOCALES, preferences_of, recipient_id

CONCURRENCY = 64
PIPELINE = 5000


async def _through_api(target: str, count: int) -> None:
    async with grpc.aio.insecure_channel(target) as channel:
        stub = preferences_pb2_grpc.PreferenceServiceStub(channel)
        pending = iter(range(count))

        async def worker() -> None:
            for n in pending:
                prefs = preferences_of(n, LOCALES[n % len(LOCALES)])
                await stub.UpdatePreferences(preferences_pb2.UpdatePreferencesRequest(preferences=prefs))

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))


async def _into_redis(redis: Redis, shards: int, count: int) -> None:
    for start in range(0, count, PIPELINE):
        pipe = redis.pipeline(transaction=False)
        for n in range(start, min(count, start + PIPELINE)):
            rid = recipient_id(n)
            prefs = preferences_of(n, LOCALES[n % len(LOCALES)])
            pipe.set(keys.preferences(keys.shard_of(rid, shards), rid), prefs.SerializeToString())
        await pipe.execute()


async def set_up_recipients(target: str, redis: Redis, shards: int, count: int) -> str:
    """Give ``count`` recipients preferences; returns how ("api" or "redis")."""
    try:
        await _through_api(target, count)
        return "api"
    except grpc.aio.AioRpcError as exc:
        if exc.code() != grpc.StatusCode.UNIMPLEMENTED:
            raise
    await _into_redis(redis, shards, count)
    return "redis"
