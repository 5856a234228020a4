"""Plumbing shared by the engine and the gateway: settings, Redis keys and scripts, the embedded
Redis, the clock and telemetry. Neither the engine nor the gateway imports the other; both import this.
"""
