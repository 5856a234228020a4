"""Several engine processes on one port: ``relais serve --workers N`` and ``loadtest.engine_proc``.

One Python process serves from one core (the interpreter lock), and gRPC alone costs a few hundred
microseconds of CPU per call, so a multi-core host runs about one worker per core. Each worker is a
fresh interpreter (``spawn``: gRPC must not be forked once started) with its own event loop, Redis
pool and gRPC server; they bind the same address with SO_REUSEPORT and the kernel spreads incoming
connections over them (event streams are then spread by load: ``engine.stream_balance``). State
lives in Redis, so any worker answers any call.

The supervisor only starts, signals and reaps:

- the first SIGTERM or SIGINT is passed on as SIGTERM (each worker drains: health NOT_SERVING, in-flight
  calls finish within the grace period); a second one is passed on too, and workers stop at once
  (from ``engine.server.SAME_STOP_S`` after the first: sooner it is the group's signal again). The
  workers ignore SIGINT themselves: a Ctrl-C reaches the whole process group, and would otherwise count
  as a second signal and cut the drain short;
- a worker that exits on its own stops the others (a half-dead engine is worse than none: its
  orchestrator restarts the whole), and the supervisor exits 1;
- a worker whose supervisor dies is sent SIGTERM by the kernel (Linux), so none is left behind.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.process import BaseProcess
from types import FrameType

from common.redis_server import free_port

log = logging.getLogger(__name__)

# ``(index) -> None``: one worker's whole life, run in its own process. It must be picklable (a
# module-level function, or a functools.partial of one with picklable arguments).
WorkerMain = Callable[[int], None]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """Ask the kernel for SIGTERM when the supervisor dies, even by SIGKILL (Linux only)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _worker(main: WorkerMain, index: int) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with_parent()
    main(index)


@dataclass
class Supervisor:
    """Start with ``run()``; it returns the exit code once every worker has exited."""

    main: WorkerMain
    count: int
    name: str = "relais-engine"
    processes: list[BaseProcess] = field(default_factory=list)
    signals: int = 0
    failed: bool = False

    def run(self) -> int:
        context = multiprocessing.get_context("spawn")
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(self.count):
                if self.signals:
                    break  # asked to stop while starting: the ones started are stopped below
                process = context.Process(
                    target=_worker, args=(self.main, index), name=f"{self.name}-{index}"
                )
                process.start()
                self.processes.append(process)
            if self.signals:
                self._forward()  # asked to stop during start-up: none may miss it (no drain needed yet)
            self._reap()
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        return 1 if self.failed else 0

    def _reap(self) -> None:
        """Wait for the workers; the first that exits unasked stops the others."""
        running = list(self.processes)
        while running:
            ready = multiprocessing.connection.wait([p.sentinel for p in running])
            for process in [p for p in running if p.sentinel in ready]:
                process.join()
                running.remove(process)
                if not self.signals:
                    log.error("%s exited with code %s: stopping the others", process.name, process.exitcode)
                    self.failed = True
                    self.signals = 1
                    self._forward()
                elif process.exitcode != 0:
                    log.warning("%s stopped with code %s", process.name, process.exitcode)
                    self.failed = True

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        log.info("%s: passing it on to %d workers", signal.Signals(signum).name, self.count)
        self._forward()

    def _forward(self) -> None:
        for process in self.processes:
            if process.is_alive() and process.pid is not None:
                os.kill(process.pid, signal.SIGTERM)

    def _stop_all(self) -> None:
        """Nothing outlives the supervisor, even when starting a worker failed half way."""
        for process in self.processes:
            if process.is_alive():
                process.terminate()
            process.join()


def shared_listen(listen: str) -> str:
    """The workers must all bind one port: port 0 ("any free port") is chosen here, once."""
    host, _, port = listen.rpartition(":")
    return f"{host}:{free_port()}" if port == "0" else listen


def run_workers(main: WorkerMain, count: int, *, name: str = "relais-engine") -> int:
    """Run ``main(index)`` for index 0..count-1, each in its own process; the exit code."""
    return Supervisor(main, count, name).run()
