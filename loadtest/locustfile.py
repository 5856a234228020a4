"""Locust users for relais: carriers streaming events, merchants registering and reading parcels,
recipients changing their preferences.

gRPC under Locust: Locust patches the standard library for gevent when it is imported, and gRPC must
then be told to cooperate (``init_gevent``) before any channel exists — hence the order of the first
lines. Every call fires a Locust request event with its response time; a batch is one request whose
``response_length`` is its number of events, and a ``Tally`` counts events and messages exactly
(summed over workers in distributed runs) so the summary speaks in events per second.

Run it with ``make loadtest`` (everything started for you) or by hand against a running engine:
``locust -f loadtest/locustfile.py --host 127.0.0.1:50051 --headless -u 12 -r 12 --relais-events 100000``
(see docs/loadtest.md for the options and for master + workers).
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gevent
import grpc
import grpc.experimental.gevent as grpc_gevent  # type: ignore[import-not-found]  # grpc-stubs lack it
from gevent.lock import BoundedSemaphore
from gevent.queue import Queue
from google.protobuf.field_mask_pb2 import FieldMask
from locust import User, between, constant, events, task
from locust.env import Environment
from locust.exception import StopUser
from locust.runners import WorkerRunner
from relais.v1 import parcel_pb2, parcel_pb2_grpc, preferences_pb2, preferences_pb2_grpc, types_pb2

from loadtest.journeys import (
    LOCALES,
    EventBudget,
    Journey,
    JourneyFactory,
    Mix,
    preferences_of,
    promised_date,
    registrations,
    split,
)
from loadtest.pacing import Send, StagePlanner, Wait
from loadtest.tally import Tally
from loadtest.wire import decode_ack, encode_next

grpc_gevent.init_gevent()

log = logging.getLogger("relais.loadtest")

STREAM_EVENTS = "/relais.v1.TrackingService/StreamEvents"
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", 64 * 1024 * 1024),
    ("grpc.max_receive_message_length", 64 * 1024 * 1024),
    # Each user on its own connection, as separate client systems are: channels to one target share
    # one otherwise, and an engine with several workers on one port spreads connections, not calls.
    ("grpc.use_local_subchannel_pool", 1),
]
CALL_TIMEOUT_S = 30.0
SETUP_CONCURRENCY = 64


def _options(parser: Any) -> None:
    group = parser.add_argument_group("relais")
    group.add_argument("--relais-events", type=int, default=1_000_000, help="tracking events in all")
    group.add_argument("--relais-batch", type=int, default=500, help="parcels per group (events per batch)")
    group.add_argument("--relais-window", type=int, default=4, help="unacknowledged batches per stream")
    group.add_argument("--relais-gap-s", type=float, default=1.0, help="seconds between a parcel's events")
    group.add_argument("--relais-groups", type=int, default=32, help="groups on the move per carrier")
    group.add_argument("--relais-recipients", type=int, default=20_000, help="recipients with preferences")
    group.add_argument("--relais-setup", action="store_true", help="create the recipients' preferences first")
    group.add_argument("--relais-carriers", type=int, default=8, help="carrier users")
    group.add_argument("--relais-merchants", type=int, default=2, help="merchant users")
    group.add_argument("--relais-prefs", type=int, default=1, help="preference-updating users")
    group.add_argument("--relais-generators", type=int, default=1, help="load-generating processes")
    group.add_argument("--relais-run-id", default="", help="parcel id prefix (default: from the clock)")
    group.add_argument("--relais-summary", default="", help="write the event tally as JSON here")


@dataclass
class Shared:
    """What the users of one process share: the event budget, recent parcels, the tally."""

    options: Any
    budget: EventBudget | None = None
    tally: Tally = field(default_factory=Tally)
    recent_parcels: deque[str] = field(default_factory=lambda: deque(maxlen=20_000))
    carriers_active: int = 0
    carriers_failed: int = 0
    stopping: bool = False
    next_carrier: int = 0
    run_id: str = ""


# Locust builds users by class, so what they share hangs off the base class; set in `_init`.
class RelaisUser(User):
    abstract = True
    shared: Shared

    def __init__(self, environment: Environment) -> None:
        super().__init__(environment)
        self.channel = grpc.insecure_channel(self.host or "127.0.0.1:50051", options=CHANNEL_OPTIONS)
        self.parcels = parcel_pb2_grpc.ParcelServiceStub(self.channel)
        self.preferences = preferences_pb2_grpc.PreferenceServiceStub(self.channel)

    def on_stop(self) -> None:
        self.channel.close()

    def timed(self, name: str, call: Callable[[], Any], length: Callable[[Any], int]) -> Any:
        """Run a unary call and fire its request event; a gRPC error is a failure, returned as None."""
        started = time.perf_counter()
        try:
            result = call()
        except grpc.RpcError as exc:
            self.shared.tally.call_failures += 1
            self.fire(name, started, 0, exc)
            return None
        self.fire(name, started, length(result), None)
        return result

    def register(self, name: str, journeys: list[Journey], promised: types_pb2.LocalDate) -> bool:
        """RegisterParcels for the journeys' parcels; False when the call failed."""
        request = registrations(journeys, promised)
        response = self.timed(
            name,
            lambda: self.parcels.RegisterParcels(request, timeout=CALL_TIMEOUT_S),
            lambda r: int(r.registered),
        )
        if response is None:
            return False
        self.shared.tally.parcels_registered += response.registered
        self.shared.tally.parcels_rejected += len(response.rejected)
        return True

    def fire(self, name: str, started: float, length: int, exc: BaseException | None) -> None:
        """A request event timed from ``started`` (``time.perf_counter``) to now."""
        self.fire_ms(name, (time.perf_counter() - started) * 1000, length, exc)

    def fire_ms(self, name: str, response_ms: float, length: int, exc: BaseException | None) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=response_ms,
            response_length=length,
            exception=exc,
            context={},
        )


@dataclass(slots=True)
class _Stream:
    """One carrier's StreamEvents call as its sender and its ack reader share it."""

    credits: BoundedSemaphore
    # seq -> (when the batch was planned to go, ``time.monotonic``; its events)
    in_flight: dict[int, tuple[float, int]] = field(default_factory=dict)
    # Set by the sender once it has sent everything: the stream ending before that is a failure.
    finished: bool = False
    failure: BaseException | None = None


class StreamEndedEarlyError(RuntimeError):
    """The engine closed the stream before the carrier had sent everything."""


class CarrierUser(RelaisUser):
    """A carrier's integration: one long-lived StreamEvents call, batches of one stage of a group of
    parcels, a bounded window of unacknowledged batches. The shop registers each group just before
    its first scan (so the parcels have recipients)."""

    wait_time = constant(0)
    fixed_count = 8

    @task
    def stream(self) -> None:
        shared = self.shared
        opts = shared.options
        index = shared.next_carrier
        shared.next_carrier += 1
        shared.carriers_active += 1
        assert shared.budget is not None
        factory = JourneyFactory(
            prefix=f"{shared.run_id}c{index}", recipients=opts.relais_recipients, mix=Mix(), seed=index
        )
        planner = StagePlanner(
            factory=factory,
            budget=shared.budget,
            parcels_per_group=opts.relais_batch,
            gap_s=opts.relais_gap_s,
            max_groups=opts.relais_groups,
        )
        try:
            self._stream(planner, opts.relais_window, index)
        finally:
            self._carrier_done()

    def _stream(self, planner: StagePlanner, window: int, index: int) -> None:
        tally = self.shared.tally
        outgoing: Queue[bytes | None] = Queue()
        stream = _Stream(credits=BoundedSemaphore(window))

        def requests() -> Iterator[bytes]:
            while (data := outgoing.get()) is not None:
                yield data

        method = self.channel.stream_stream(
            STREAM_EVENTS, request_serializer=None, response_deserializer=decode_ack
        )
        acks = method(requests())
        reader = gevent.spawn(self._read_acks, acks, stream)
        seq = 0
        promised = promised_date(time.time_ns() // 1_000_000)
        while stream.failure is None and (step := planner.next(time.monotonic())) is not None:
            if isinstance(step, Wait):
                gevent.sleep(step.seconds)
                continue
            assert isinstance(step, Send)
            planned_s = step.planned_s
            if step.new:
                if self.register("RegisterParcels", step.group.journeys, promised):
                    self.shared.recent_parcels.extend(j.parcel_id for j in step.group.journeys)
                # A shop registers long before the first scan; the generator does it inline only so
                # the parcels exist, and its time is RegisterParcels', not this batch's.
                planned_s = time.monotonic()
            stream.credits.acquire()
            if stream.failure is not None:
                break  # the reader let us through because the stream broke, not for window room
            seq += 1
            data, count = encode_next(step.group, seq, time.time_ns() // 1_000_000)
            # Timed from when the batch was due, not from when the window let it through: a
            # slow engine that holds the sender back shows in the latency (no coordinated omission).
            stream.in_flight[seq] = (planned_s, count)
            if not tally.first_send_s:
                tally.first_send_s = time.time()
            tally.events_sent += count
            outgoing.put(data)
            planner.sent(step.group, time.monotonic())
        stream.finished = stream.failure is None
        outgoing.put(None)
        reader.join()
        if stream.failure is not None:
            self._broken(stream, index)

    def _read_acks(self, acks: Any, stream: _Stream) -> None:
        tally = self.shared.tally
        try:
            for ack in acks:
                planned_s, count = stream.in_flight.pop(ack.seq)
                tally.batches += 1
                tally.events_accepted += ack.accepted
                tally.events_duplicate += ack.duplicates
                tally.events_rejected += len(ack.rejected)
                tally.last_ack_s = time.time()
                self.fire_ms("StreamEvents batch", (time.monotonic() - planned_s) * 1000, count, None)
                stream.credits.release()
            if not stream.finished:
                raise StreamEndedEarlyError("the engine ended the stream before the carrier was done")
        except Exception as exc:
            # Whatever ended the reader (an RPC error, an ack for no batch, an early end), the sender
            # must not wait for window room that will never come: record it and let it through.
            stream.failure = exc
            with contextlib.suppress(ValueError):  # the window was not full: nobody is waiting
                stream.credits.release()

    def _broken(self, stream: _Stream, index: int) -> None:
        """The stream broke: every batch still in flight is lost (say so, once each), and the run
        must fail, not wait for its time cap."""
        tally, exc = self.shared.tally, stream.failure
        for _planned_s, _count in stream.in_flight.values():
            tally.batch_failures += 1
            self.fire_ms("StreamEvents batch", 0.0, 0, exc)
        stream.in_flight.clear()
        tally.streams_broken += 1
        self.shared.carriers_failed += 1
        # The status code only: an error's details may quote a request.
        code = exc.code() if isinstance(exc, grpc.RpcError) else type(exc).__name__
        log.error("carrier %d: StreamEvents failed (%s): its remaining events were not sent", index, code)

    def _carrier_done(self) -> None:
        shared = self.shared
        shared.carriers_active -= 1
        spent = shared.budget is not None and shared.budget.remaining == 0
        failed = shared.carriers_failed
        # After a broken stream the budget may never be spent: stop anyway rather than idle the
        # other users until the time cap.
        if shared.carriers_active == 0 and (spent or failed) and not shared.stopping:
            shared.stopping = True
            if failed:
                log.error("every carrier has stopped, %d of them on a broken stream: stopping", failed)
            else:
                log.info("every carrier has sent its events: stopping")
            runner = self.environment.runner
            if isinstance(runner, WorkerRunner):
                # A worker that quits by itself sends no final report (only one the master asked
                # to quit does): send it, or the master misses the last seconds' counts.
                runner._send_stats()
            if runner is not None:
                gevent.spawn_later(0.1, runner.quit)
        raise StopUser()


class MerchantUser(RelaisUser):
    """A merchant's systems: register a few parcels now and then, and mostly ask where parcels are."""

    wait_time = between(0.01, 0.05)
    fixed_count = 2

    def on_start(self) -> None:
        self.rng = random.Random()
        self.factory = JourneyFactory(
            prefix=f"{self.shared.run_id}m{id(self) % 100_000}",
            recipients=self.shared.options.relais_recipients,
        )

    @task(10)
    def get_parcel(self) -> None:
        recent = self.shared.recent_parcels
        if not recent:
            return
        parcel_id = recent[self.rng.randrange(len(recent))]
        request = parcel_pb2.GetParcelRequest(parcel_id=parcel_id)
        view = self.timed(
            "GetParcel",
            lambda: self.parcels.GetParcel(request, timeout=CALL_TIMEOUT_S),
            lambda v: v.ByteSize(),
        )
        if view is not None:
            self.shared.tally.parcel_reads += 1

    @task(1)
    def register_some(self) -> None:
        self.register(
            "RegisterParcels (merchant)",
            [self.factory.make() for _ in range(20)],
            promised_date(time.time_ns() // 1_000_000),
        )


class PreferenceUser(RelaisUser):
    """Recipients changing their language through the merchant's account page."""

    wait_time = between(0.05, 0.2)
    fixed_count = 1

    @task
    def update(self) -> None:
        n = random.randrange(self.shared.options.relais_recipients)
        request = preferences_pb2.UpdatePreferencesRequest(
            preferences=preferences_of(n, random.choice(LOCALES)), update_mask=FieldMask(paths=["locale"])
        )
        result = self.timed(
            "UpdatePreferences",
            lambda: self.preferences.UpdatePreferences(request, timeout=CALL_TIMEOUT_S),
            lambda p: p.ByteSize(),
        )
        if result is not None:
            self.shared.tally.preference_updates += 1


def setup_recipients(host: str, count: int) -> None:
    """Give every load-test recipient preferences before the first parcel is registered."""
    channel = grpc.insecure_channel(host, options=CHANNEL_OPTIONS)
    stub = preferences_pb2_grpc.PreferenceServiceStub(channel)
    pending = iter(range(count))

    def worker() -> None:
        for n in pending:
            request = preferences_pb2.UpdatePreferencesRequest(preferences=preferences_of(n, LOCALES[n % 6]))
            stub.UpdatePreferences(request, timeout=CALL_TIMEOUT_S)

    started = time.monotonic()
    gevent.joinall([gevent.spawn(worker) for _ in range(SETUP_CONCURRENCY)], raise_error=True)
    channel.close()
    log.info("preferences of %d recipients set in %.1fs", count, time.monotonic() - started)


def _init(environment: Environment, **_kwargs: Any) -> None:
    opts = environment.parsed_options
    if opts is None:
        return
    RelaisUser.shared = Shared(options=opts)
    CarrierUser.fixed_count = opts.relais_carriers
    MerchantUser.fixed_count = opts.relais_merchants
    PreferenceUser.fixed_count = opts.relais_prefs


def _test_start(environment: Environment, **_kwargs: Any) -> None:
    shared = RelaisUser.shared
    opts = shared.options
    runner = environment.runner
    worker = runner.worker_index if isinstance(runner, WorkerRunner) else 0
    shared.run_id = f"{opts.relais_run_id or format(int(time.time()), 'x')}w{worker}"
    generators = max(1, opts.relais_generators)
    shared.budget = EventBudget(split(opts.relais_events, generators)[worker % generators])
    if opts.relais_setup and not isinstance(runner, WorkerRunner):
        setup_recipients(environment.host or "127.0.0.1:50051", opts.relais_recipients)


def _report(client_id: str, data: dict[str, Any], **_kwargs: Any) -> None:
    data["relais"] = RelaisUser.shared.tally.take()


def _worker_report(client_id: str, data: dict[str, Any], **_kwargs: Any) -> None:
    if "relais" in data:
        RelaisUser.shared.tally.add(data["relais"])


def _quitting(environment: Environment, **_kwargs: Any) -> None:
    if isinstance(environment.runner, WorkerRunner):
        return
    shared = RelaisUser.shared
    tally = shared.tally
    summary = {**tally.snapshot(), "event_seconds": tally.event_seconds, "events_per_s": tally.events_per_s}
    log.info(
        "events accepted %d, duplicates %d, rejected %d in %.1fs: %.0f events/s",
        tally.events_accepted,
        tally.events_duplicate,
        tally.events_rejected,
        tally.event_seconds,
        tally.events_per_s,
    )
    if shared.options.relais_summary:
        Path(shared.options.relais_summary).write_text(json.dumps(summary, indent=2))


def _progress(environment: Environment) -> None:
    """Every 10 s, events per second (not batches per second) in the log."""
    tally = RelaisUser.shared.tally
    last = 0
    while True:
        gevent.sleep(10)
        done = tally.events_accepted + tally.events_duplicate
        log.info("events acknowledged: %d (%.0f/s over the last 10 s)", done, (done - last) / 10)
        last = done


def _start_progress(environment: Environment, **_kwargs: Any) -> None:
    if not isinstance(environment.runner, WorkerRunner):
        gevent.spawn(_progress, environment)


def _on(hook: Any, listener: Callable[..., None]) -> None:
    """Locust's hooks are untyped; registering through ``Any`` keeps the listeners checked."""
    hook.add_listener(listener)


_on(events.init_command_line_parser, _options)
_on(events.init, _init)
_on(events.test_start, _test_start)
_on(events.report_to_master, _report)
_on(events.worker_report, _worker_report)
_on(events.quitting, _quitting)
_on(events.test_start, _start_progress)
