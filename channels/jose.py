"""Compact JWS (RFC 7515) signing for the two tokens channels need: the RS256 assertion of a Google
service account (FCM) and the ES256 VAPID token (Web Push, RFC 8292). Built on ``cryptography``
directly: a JWT is three base64url parts and one signature, not worth a dependency.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Mapping

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

# ES256 signatures are r || s, each a 32-byte big-endian integer (RFC 7518 §3.4), not DER.
_P256_COORD_BYTES = 32


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _signing_input(header: Mapping[str, object], claims: Mapping[str, object]) -> bytes:
    def part(value: Mapping[str, object]) -> str:
        return b64url(json.dumps(value, separators=(",", ":"), sort_keys=True).encode())

    return f"{part(header)}.{part(claims)}".encode("ascii")


def sign_rs256(key: rsa.RSAPrivateKey, claims: Mapping[str, object], *, kid: str = "") -> str:
    header: dict[str, object] = {"alg": "RS256", "typ": "JWT"}
    if kid:
        header["kid"] = kid
    signing_input = _signing_input(header, claims)
    signature = key.sign(signing_input, padding.PKCS1v15(), hashes.SHA256())
    return f"{signing_input.decode('ascii')}.{b64url(signature)}"


def sign_es256(key: ec.EllipticCurvePrivateKey, claims: Mapping[str, object]) -> str:
    signing_input = _signing_input({"alg": "ES256", "typ": "JWT"}, claims)
    r, s = decode_dss_signature(key.sign(signing_input, ec.ECDSA(hashes.SHA256())))
    raw = r.to_bytes(_P256_COORD_BYTES, "big") + s.to_bytes(_P256_COORD_BYTES, "big")
    return f"{signing_input.decode('ascii')}.{b64url(raw)}"
