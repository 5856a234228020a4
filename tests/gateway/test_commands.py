"""``relais dlq list | replay`` as an operator runs them: the real command in a subprocess."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import cast

from redis import Redis

from common import keys
from tests.gateway.support import SHARDS, make_notice


def relais(redis_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "REDIS_URL": redis_url, "RELAIS_SHARDS": str(SHARDS)}
    return subprocess.run(
        [sys.executable, "-m", "cli.main", *args], env=env, capture_output=True, text=True, timeout=60
    )


def test_dlq_list_and_replay(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    client.flushdb()
    notice = make_notice("p-cli", version=2)
    notice.attempt = 6
    shard = notice.shard
    client.hset(
        keys.parcel(shard, "p-cli"), mapping={"n:SHIPPED": notice.SerializeToString(), "nv:SHIPPED": 2}
    )
    entry = {"n": notice.SerializeToString(), "reason": "boom", "at": 0}
    stream_id = cast(bytes, client.xadd(keys.dead_letters(shard), entry))  # type: ignore[arg-type]
    letter_id = f"{shard}/{stream_id.decode()}"

    listed = relais(redis_url, "dlq", "list")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.split("\t")[0] == letter_id
    assert "p-cli:SHIPPED\tv2\tattempt 6\tboom" in listed.stdout

    # One id that is there, one that is not: the one is replayed, the other reported (exit status 1).
    replayed = relais(redis_url, "dlq", "replay", letter_id, f"{shard}/1-0")
    assert replayed.returncode == 1
    assert "replayed 1, superseded 0, missing 1" in replayed.stdout
    assert f"not found: {shard}/1-0" in replayed.stderr
    assert client.xlen(keys.dead_letters(shard)) == 0
    assert client.zscore(keys.due(shard), "p-cli:SHIPPED") is not None
    client.close()


def test_a_standalone_gateway_needs_its_channels_named(redis_url: str) -> None:
    """Without RELAIS_CHANNELS it would write recipients' messages to local files and call them sent."""
    env = {k: v for k, v in os.environ.items() if k != "RELAIS_CHANNELS"}
    env |= {"REDIS_URL": redis_url}
    done = subprocess.run(
        [sys.executable, "-m", "cli.main", "gateway"], env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "set RELAIS_CHANNELS" in done.stderr
