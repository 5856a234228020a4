"""What one channel's results mean for a notice. Pure.

A notice sent through a channel reaches one address (email, SMS) or several (each push device). The
channel succeeded if any address accepted; it failed for now if any failure was transient (retry the
notice later); it failed for good when every address failed permanently (fall back to the next
channel). Addresses a provider rejected for good are dead and leave the preferences either way.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Sequence
from dataclasses import dataclass

from channels.base import Accepted, Destination, PermanentFailure, SendResult, TransientFailure


class Verdict(enum.Enum):
    SENT = "sent"
    RETRY = "retry"
    FALL_BACK = "fall_back"


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    accepted: Accepted | None = None
    # Index of the target that accepted (for its provider name).
    accepted_index: int = -1
    reason: str = ""
    retry_after_ms: int = 0
    dead: tuple[Destination, ...] = ()


def judge(results: Sequence[SendResult | None], destinations: Sequence[Destination]) -> Outcome:
    """``results[i]`` is the result for ``destinations[i]``, None where another gateway sends it."""
    if len(results) == 1 and isinstance(results[0], Accepted):
        return Outcome(Verdict.SENT, accepted=results[0], accepted_index=0)  # the common case
    dead = tuple(
        to
        for to, result in zip(destinations, results, strict=True)
        if isinstance(result, PermanentFailure) and result.destination_invalid
    )
    for index, result in enumerate(results):
        if isinstance(result, Accepted):
            return Outcome(Verdict.SENT, accepted=result, accepted_index=index, dead=dead)
    transient = [r for r in results if isinstance(r, TransientFailure)]
    if transient:
        retry_after_s = max((r.retry_after_s or 0.0) for r in transient)
        return Outcome(
            Verdict.RETRY, reason=transient[0].reason, retry_after_ms=int(retry_after_s * 1000), dead=dead
        )
    permanent = [r for r in results if isinstance(r, PermanentFailure)]
    if not permanent:
        # The gateway judges a notice only when one of its sends was its own (see _settle_unclaimed).
        raise ValueError("no result to judge: every address is another gateway's")
    return Outcome(Verdict.FALL_BACK, reason=permanent[0].reason, dead=dead)


def backoff_ms(attempt: int, *, base_s: float, max_s: float, rng: random.Random) -> int:
    """Exponential backoff with jitter: between half and all of ``min(max, base * 2^attempt)``, so
    retries of a burst of failures spread out instead of returning together."""
    ceiling_s = min(max_s, base_s * (2 ** min(attempt, 32)))
    return int(ceiling_s * 1000 * rng.uniform(0.5, 1.0))
