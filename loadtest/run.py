"""``make loadtest``: a million tracking events through the whole system, headless, one command.

1. starts the private stack (Redis, engine with its scheduler, counting gateways: ``loadtest.stack``);
2. gives the recipients preferences;
3. runs Locust (``loadtest/locustfile.py``) headless until every carrier has sent its share of the
   events (``--run-time`` is only a safety cap);
4. waits for the gateways to drain (nothing due unclaimed, every outbox entry acknowledged), watched
   from the start so the drain is timed from the last ack to the first moment nothing was left;
5. audits (``loadtest.audit``): every expected notice delivered exactly once, nothing else delivered;
6. prints a summary and writes it with Locust's HTML report and CSVs under ``loadtest/results/``.

Knobs: the options below, passed through make as ``make loadtest ARGS="--events 200000"`` (the
environment is read in one place only, ``common/settings.py``, and this harness is not it).
``--quick`` is the smoke profile (5,000 events, well under 30 s). Exit status 0 only when every event
was accepted, no stream broke, the system drained, and the notices delivered were exactly the
expected ones, each once (none withdrawn among them).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, get_type_hints

from common.redis_client import connect
from loadtest.audit import Audit, Backlog, DrainWatch, audit, wait_drained, watch
from loadtest.counting_channel import read_deliveries
from loadtest.recipients import set_up_recipients
from loadtest.stack import Stack, StackConfig

RESULTS = Path(__file__).parent / "results"
# How often the drain is looked at, during the load and after: the drain figure's resolution.
DRAIN_POLL_S = 0.1
LOCUSTFILE = Path(__file__).parent / "locustfile.py"


@dataclass(frozen=True, slots=True)
class Profile:
    events: int
    carriers: int
    merchants: int
    prefs: int
    spawn_rate: float
    batch: int
    window: int
    gap_s: float
    groups: int
    recipients: int
    duration_s: int
    drain_timeout_s: float
    gateways: int
    shards: int
    # Engine processes on its port: one per core for the full run, as an operator runs it.
    engine_workers: int


FULL = Profile(
    events=1_000_000,
    carriers=8,
    merchants=2,
    prefs=1,
    spawn_rate=20.0,
    batch=500,
    window=4,
    gap_s=2.0,
    groups=64,
    recipients=20_000,
    duration_s=1800,
    drain_timeout_s=600,
    gateways=2,
    shards=16,
    engine_workers=os.cpu_count() or 1,
)
QUICK = Profile(
    events=5_000,
    carriers=2,
    merchants=1,
    prefs=1,
    spawn_rate=10.0,
    batch=100,
    window=4,
    gap_s=1.0,
    groups=16,
    recipients=500,
    duration_s=120,
    drain_timeout_s=60,
    gateways=1,
    shards=16,
    engine_workers=1,
)


def parse_args(argv: list[str] | None = None) -> tuple[Profile, argparse.Namespace]:
    parser = argparse.ArgumentParser(prog="python -m loadtest.run", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="the smoke profile (5,000 events)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="results folder (default: a new one, and loadtest-summary.json is updated)",
    )
    parser.add_argument(
        "--engine",
        choices=("proc", "cli"),
        default="proc",
        help="proc: python -m loadtest.engine_proc (default); cli: relais serve",
    )
    # Each option parses as its field is declared (``--spawn-rate 2.5`` is a float), not as the
    # profile's value happens to be written.
    for name, kind in get_type_hints(Profile).items():
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            type=kind,
            default=None,
            help="default: the profile's (see docs/loadtest.md)",
        )
    args = parser.parse_args(argv)
    base = QUICK if args.quick else FULL
    chosen: dict[str, Any] = {}
    for name, value in asdict(base).items():
        raw = getattr(args, name)
        chosen[name] = value if raw is None else raw
    return Profile(**chosen), args


def locust_command(profile: Profile, target: str, out: Path) -> list[str]:
    users = profile.carriers + profile.merchants + profile.prefs
    # fmt: off
    return [
        str(Path(sys.executable).with_name("locust")), "-f", str(LOCUSTFILE),
        "--host", target, "--headless", "--only-summary",
        "--users", str(users), "--spawn-rate", str(profile.spawn_rate),
        "--run-time", f"{profile.duration_s}s", "--stop-timeout", "10",
        "--html", str(out / "locust.html"), "--csv", str(out / "locust"),
        "--loglevel", "INFO", "--exit-code-on-error", "0",
        "--relais-events", str(profile.events), "--relais-batch", str(profile.batch),
        "--relais-window", str(profile.window), "--relais-gap-s", str(profile.gap_s),
        "--relais-groups", str(profile.groups), "--relais-recipients", str(profile.recipients),
        "--relais-carriers", str(profile.carriers), "--relais-merchants", str(profile.merchants),
        "--relais-prefs", str(profile.prefs), "--relais-summary", str(out / "tally.json"),
    ]
    # fmt: on


def latency(stats_csv: Path, name: str) -> dict[str, float | int | None]:
    """p50/p95/p99 (ms) and counts of one request name from Locust's ``_stats.csv``."""
    if stats_csv.exists():
        with stats_csv.open() as f:
            for row in csv.DictReader(f):
                if row["Name"] == name:
                    return {
                        "requests": int(row["Request Count"]),
                        "failures": int(row["Failure Count"]),
                        "p50_ms": float(row["50%"]),
                        "p95_ms": float(row["95%"]),
                        "p99_ms": float(row["99%"]),
                    }
    return {"requests": 0, "failures": 0, "p50_ms": None, "p95_ms": None, "p99_ms": None}


@dataclass(frozen=True, slots=True)
class Outcome:
    backlog: Backlog
    # Unix seconds: when the final drained stretch began (None: never drained), when the wait ended.
    drained_at_s: float | None
    waited_until_s: float
    audit: Audit
    recipients_via: str


async def _prepare(stack: Stack, profile: Profile) -> str:
    redis = connect(stack.redis_url)
    try:
        return await set_up_recipients(stack.target, redis, profile.shards, profile.recipients)
    finally:
        await redis.aclose()


async def _load(stack: Stack, profile: Profile, out: Path, drain: DrainWatch) -> int:
    """Run Locust to its end while watching the backlog, so the drain's start is seen as it happens.
    Locust's exit status; -9 when it overran its cap and was killed."""
    redis = connect(stack.redis_url)
    try:
        with (out / "locust.log").open("wb") as log:
            proc = await asyncio.create_subprocess_exec(
                *locust_command(profile, stack.target, out), stdout=log, stderr=subprocess.STDOUT
            )
            watcher = asyncio.create_task(
                watch(redis, profile.shards, drain, lambda: proc.returncode is not None, DRAIN_POLL_S)
            )
            try:
                return await asyncio.wait_for(proc.wait(), timeout=profile.duration_s + 120)
            except TimeoutError:
                proc.kill()
                await proc.wait()
                return -9
            finally:
                await watcher
    finally:
        await redis.aclose()


async def _finish(stack: Stack, profile: Profile, recipients_via: str, drain: DrainWatch) -> Outcome:
    redis = connect(stack.redis_url)
    try:
        seen, drained_at = await wait_drained(
            redis, profile.shards, timeout_s=profile.drain_timeout_s, poll_s=DRAIN_POLL_S, drain=drain
        )
        waited_until = time.time()
        stack.stop_gateways()  # flushes and closes the sinks before they are read
        result = await audit(redis, profile.shards, read_deliveries(stack.config.sink_dir))
        return Outcome(seen, drained_at, waited_until, result, recipients_via)
    finally:
        await redis.aclose()


def drain_seconds(outcome: Outcome, last_ack_s: float) -> float | None:
    """From the last ack to the first moment the system had nothing left (or, never drained, to the
    end of the wait); None without any ack to measure from."""
    if not last_ack_s:
        return None
    end = outcome.drained_at_s if outcome.drained_at_s is not None else outcome.waited_until_s
    # The last batch may plan nothing due now, so the drained stretch may begin before its ack.
    return max(0.0, end - last_ack_s)


def summarize(profile: Profile, out: Path, outcome: Outcome, timings: dict[str, float]) -> dict[str, Any]:
    tally: dict[str, Any] = (
        json.loads((out / "tally.json").read_text()) if (out / "tally.json").exists() else {}
    )
    stats_csv = out / "locust_stats.csv"
    result = outcome.audit
    event_s = float(tally.get("event_seconds") or 0.0)
    drain_s = drain_seconds(outcome, float(tally.get("last_ack_s") or 0.0))
    pipeline_s = event_s + (drain_s or 0.0)
    get_parcel: dict[str, Any] = {
        **latency(stats_csv, "GetParcel"),
        # Each merchant user waits for its answer before asking again: a slow engine is asked less,
        # so this understates queueing. The open-loop figure is `make bench`'s.
        "loop": "closed",
        "users": profile.merchants,
    }
    return {
        "profile": asdict(profile),
        "events_sent": tally.get("events_sent", 0),
        "events_accepted": tally.get("events_accepted", 0),
        "events_duplicate": tally.get("events_duplicate", 0),
        "events_rejected": tally.get("events_rejected", 0),
        "batch_failures": tally.get("batch_failures", 0),
        "streams_broken": tally.get("streams_broken", 0),
        "call_failures": tally.get("call_failures", 0),
        "parcels_registered": tally.get("parcels_registered", 0),
        "notices_planned": result.planned,
        "notices_withdrawn": result.withdrawn,
        "notices_scheduled_later": result.scheduled_later,
        "notices_expected": result.expected,
        "notices_delivered": result.delivered,
        "notices_missing": result.missing,
        "notices_duplicated": result.duplicated_keys + result.duplicated_notices,
        "notices_unexpected": result.unexpected,
        "notices_withdrawn_delivered": result.withdrawn_delivered,
        "notices_extra": result.extra,
        "missing_sample": list(result.missing_sample),
        "withdrawn_delivered_sample": list(result.withdrawn_delivered_sample),
        "extra_sample": list(result.extra_sample),
        "duplicated_sample": list(result.duplicated_sample),
        "exactly_once": result.exactly_once,
        "drained": outcome.backlog.drained,
        "backlog": asdict(outcome.backlog),
        "events_seconds": event_s,
        "drain_seconds": drain_s,
        "events_per_s": float(tally.get("events_per_s") or 0.0),
        "notices_per_s": result.delivered / pipeline_s if pipeline_s > 0 else 0.0,
        # Timed from each batch's planned send time, so waiting for window room counts.
        "ack_latency": latency(stats_csv, "StreamEvents batch"),
        "get_parcel_latency": get_parcel,
        "register_latency": latency(stats_csv, "RegisterParcels"),
        "due_to_send_lag_ms": {
            "p50": result.lag_ms_p50,
            "p95": result.lag_ms_p95,
            "p99": result.lag_ms_p99,
            "max": result.lag_ms_max,
        },
        "recipients_via": outcome.recipients_via,
        **timings,
    }


def passed(summary: dict[str, Any]) -> bool:
    return bool(
        summary["exactly_once"]
        and summary["notices_delivered"] == summary["notices_expected"]
        and summary["notices_withdrawn_delivered"] == 0
        and summary["drained"]
        and summary["events_accepted"] + summary["events_duplicate"] == summary["profile"]["events"]
        and summary["events_rejected"] == 0
        and summary["batch_failures"] == 0
        and summary["streams_broken"] == 0
    )


def report(summary: dict[str, Any]) -> str:
    ack, get = summary["ack_latency"], summary["get_parcel_latency"]
    lag = summary["due_to_send_lag_ms"]
    verdict = "PASSED" if passed(summary) else "FAILED"
    drain = summary["drain_seconds"]
    lines = [
        f"relais load test: {verdict}",
        f"  events accepted      {summary['events_accepted']:>12,} of {summary['profile']['events']:,}"
        f" (duplicates {summary['events_duplicate']}, rejected {summary['events_rejected']})",
        f"  notices planned      {summary['notices_planned']:>12,}"
        f" (withdrawn {summary['notices_withdrawn']:,}, for later {summary['notices_scheduled_later']:,})",
        f"  notices expected     {summary['notices_expected']:>12,}",
        f"  notices delivered    {summary['notices_delivered']:>12,}"
        f" (missing {summary['notices_missing']}, duplicated {summary['notices_duplicated']},"
        f" unexpected {summary['notices_unexpected']}, withdrawn yet sent"
        f" {summary['notices_withdrawn_delivered']}, not expected {summary['notices_extra']})",
        f"  exactly once         {'yes' if summary['exactly_once'] else 'NO'}",
        *_ids("missing", summary["missing_sample"]),
        *_ids("withdrawn yet sent", summary["withdrawn_delivered_sample"]),
        *_ids("not expected", summary["extra_sample"]),
        *_ids("duplicated", summary["duplicated_sample"]),
        f"  failures             {summary['batch_failures']} batches, {summary['call_failures']} calls,"
        f" {summary['streams_broken']} broken streams",
        f"  events phase         {summary['events_seconds']:>12.1f} s"
        f"  ({summary['events_per_s']:,.0f} events/s)",
        f"  drain after last ack {'n/a' if drain is None else f'{drain:.1f}':>12} s"
        f"  ({summary['notices_per_s']:,.0f} notices/s overall)",
        f"  ack latency          p50 {ack['p50_ms']} ms, p95 {ack['p95_ms']} ms, p99 {ack['p99_ms']} ms"
        " (from each batch's planned send)",
        f"  GetParcel latency    p50 {get['p50_ms']} ms, p95 {get['p95_ms']} ms, p99 {get['p99_ms']} ms"
        f" (closed loop: {get['users']} merchant user(s), each awaiting its answer; open loop: make bench)",
        f"  due → sent lag       p50 {_ms(lag['p50'])}, p95 {_ms(lag['p95'])}, p99 {_ms(lag['p99'])}",
        f"  engine RSS           {summary.get('engine_rss_bytes') or 0:>12,} bytes",
    ]
    return "\n".join(lines)


def _ids(what: str, sample: list[str]) -> list[str]:
    """One line naming the first notices (by id) of a failed check; none when it passed."""
    return [f"    {what + ':':<18} {', '.join(sample)}"] if sample else []


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:,.0f} ms"


def run(profile: Profile, out: Path, *, engine: str = "proc") -> dict[str, Any]:
    out.mkdir(parents=True, exist_ok=True)
    config = StackConfig(
        run_dir=out,
        shards=profile.shards,
        gateways=profile.gateways,
        engine=engine,
        engine_workers=profile.engine_workers,
    )
    started = time.monotonic()
    with Stack(config) as stack:
        recipients_via = asyncio.run(_prepare(stack, profile))
        setup_s = time.monotonic() - started
        drain = DrainWatch()
        code = asyncio.run(_load(stack, profile, out, drain))
        if code != 0:
            print(f"locust exited with {code}: see {out / 'locust.log'}", file=sys.stderr)
        stack.check_alive()
        outcome = asyncio.run(_finish(stack, profile, recipients_via, drain))
        engine_rss = stack.engine_rss_bytes()
    timings = {"setup_seconds": setup_s, "total_seconds": time.monotonic() - started}
    summary = summarize(profile, out, outcome, timings)
    summary["engine_rss_bytes"] = engine_rss
    summary["passed"] = passed(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def main(argv: list[str] | None = None) -> int:
    profile, args = parse_args(argv)
    out = args.out or RESULTS / f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    summary = run(profile, out, engine=args.engine)
    if args.out is None:
        # Only a run into the default folder is "the latest run": a test's or a probe's run with
        # its own --out must not replace the summary of the last real one.
        (RESULTS / "loadtest-summary.json").write_text(json.dumps(summary, indent=2))
    print(report(summary))
    print(f"  results              {out} (locust.html, locust_*.csv, summary.json)")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
