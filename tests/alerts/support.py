"""Builders shared by the alert tests."""

from __future__ import annotations

from relais.v1 import types_pb2

from engine.alert_rules import ParcelFacts
from tests.conftest import T0_MS


def parcel_facts(
    parcel_id: str = "PX1", status: int = types_pb2.TRACKING_STATUS_IN_TRANSIT, **kw: object
) -> ParcelFacts:
    """An acme parcel created, first scanned and last scanned at T0; ``kw`` sets any other field."""
    base: dict[str, object] = {
        "parcel_id": parcel_id,
        "merchant_id": "acme",
        "status": status,
        "created_ms": T0_MS,
        "first_scan_ms": T0_MS,
        "last_event_ms": T0_MS,
    }
    base.update(kw)
    return ParcelFacts(**base)  # type: ignore[arg-type]
