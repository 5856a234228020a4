"""The engine: gRPC services, parcel state, notice planning, the scheduler and alerts.

It never sends a message itself: due notices go to the ``outbox:{s}`` streams for the gateway.
"""
