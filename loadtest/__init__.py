"""Load tests and benchmarks: Locust users for every kind of client (``locustfile``), the one-command
headless run (``run``), the benchmark table with its baselines (``bench``) and the parts they share:
synthetic parcel journeys, the private stack, a counting channel and Redis counters.
"""
