"""A recorded attempt: its bytes appended to earlier ones parse as one view with every attempt."""

from __future__ import annotations

from relais.v1 import notice_pb2, types_pb2

from gateway.settle import attempt_view, timestamp


def test_attempt_view_is_the_serialised_notice_view() -> None:
    earlier = notice_pb2.DeliveryAttempt(status=notice_pb2.NOTICE_STATUS_RETRYING, error="timeout")
    for error in ("", "x" * 100, "é" * 200, "y" * 20_000):
        attempt = notice_pb2.DeliveryAttempt(
            channel=types_pb2.CHANNEL_EMAIL,
            provider="email",
            status=notice_pb2.NOTICE_STATUS_SENT,
            attempted_at=timestamp(1_700_000_000_123),
            error=error,
            idempotency_key="p-1:SHIPPED:1:email",
            version=3,
        )
        view = attempt_view(attempt)
        assert view == notice_pb2.NoticeView(attempts=[attempt]).SerializeToString()
        both = notice_pb2.NoticeView()
        both.ParseFromString(attempt_view(earlier) + view)
        assert list(both.attempts) == [earlier, attempt]
