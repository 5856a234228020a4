"""Fixtures shared by the channel tests."""

from __future__ import annotations

import ssl

import pytest
from cryptography.hazmat.primitives.asymmetric import rsa


@pytest.fixture(scope="session")
def client_tls() -> ssl.SSLContext:
    """One default client TLS context for every HTTP channel built in the run: loading the CA
    store per channel would dominate the tests' time."""
    return ssl.create_default_context()


@pytest.fixture(scope="session")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)
