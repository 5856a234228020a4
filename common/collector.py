"""The cyclic garbage collector's settings for a relais process that serves (an engine worker, a
gateway).

Python's defaults collect the youngest generation every 700 net container allocations. Work in
flight (an ingest batch waiting on Redis, a gateway batch until it is settled) stays alive across
hundreds of those collections, is walked again by each, and is promoted until it triggers full
collections over the whole heap. Measured with gc callbacks on 100,000 events applied by the engine
core (``python -m loadtest.ingest_cpu --events 100000``), the collector's CPU:

- Python's (700, 10, 10): 4.1-4.5 s, 40 full collections of ~75 ms, about a fifth of the engine's CPU;
- (10000, 20, 20): 0.98 s, no full collection;
- (100000, 20, 20): 0.3-0.4 s, but a young collection then walks up to 100k live objects of the
  batches in flight, pauses of 10-150 ms on a loaded machine.

Reads set the engine's threshold: GetParcel calls add ~7.6 net container allocations each (the
young generation's count over 5,000 calls to one worker: call objects in reference cycles, which
only a collection frees), so at 100,000 one collection in ~13,000 calls would walk them all while
callers wait. The engine uses 10,000 (``ENGINE_YOUNG_THRESHOLD``); the gateway, which serves no
caller, 100,000 (``GATEWAY_YOUNG_THRESHOLD``: a batch of 4,096 notices keeps ~80k objects alive
until it is settled; on its drain the collector took 10-17% of its CPU with the defaults, about 0
after).
"""

from __future__ import annotations

import gc

ENGINE_YOUNG_THRESHOLD = 10_000
GATEWAY_YOUNG_THRESHOLD = 100_000


def tune_collector(young_threshold: int) -> None:
    """Once the process is ready to serve: what start-up allocated (modules, descriptors, templates,
    servicers) lives as long as the process, so it is collected once and frozen out of later walks;
    then a young collection waits for ``young_threshold`` net container allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(young_threshold, 20, 20)
