"""The cyclic garbage collector's settings for a relais process that serves (the engine's workers,
the gateways).

Python's defaults collect the youngest generation every 700 net container allocations. Work in
flight (an ingest batch waiting on Redis, a gateway batch until it is settled) stays alive across
hundreds of those collections, is walked again by each, and is promoted until it triggers full
collections over the whole heap. Measured with gc callbacks on 100,000 events applied by the engine
core (``python -m loadtest.ingest_cpu --events 100000``): 4.1-4.5 s of collector CPU with the
defaults, 40 full collections of ~75 ms each, about a fifth of the engine's CPU; 0.3-0.4 s with
these settings. On the gateway's drain the collector took 10-17% of its CPU, about 0 after.
"""

from __future__ import annotations

import gc

# Net container allocations between two collections of the youngest generation: a batch's worth
# (an ingest batch of 500 events or a gateway batch of 4,096 notices keeps ~20 objects per item alive).
GC_THRESHOLD = 100_000


def tune_collector() -> None:
    """Once the process is ready to serve: what start-up allocated (modules, descriptors, templates,
    servicers) lives as long as the process, so it is collected once and frozen out of later walks;
    then collections wait for a batch's worth of allocations."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_THRESHOLD, 20, 20)
