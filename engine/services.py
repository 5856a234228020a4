"""The relais.v1 service names the engine serves, for health and reflection."""

from __future__ import annotations

from relais.v1 import alerts_pb2, parcel_pb2, preferences_pb2, tracking_pb2

SERVICE_NAMES: tuple[str, ...] = (
    tracking_pb2.DESCRIPTOR.services_by_name["TrackingService"].full_name,
    parcel_pb2.DESCRIPTOR.services_by_name["ParcelService"].full_name,
    preferences_pb2.DESCRIPTOR.services_by_name["PreferenceService"].full_name,
    alerts_pb2.DESCRIPTOR.services_by_name["AlertService"].full_name,
)
