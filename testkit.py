"""Helpers the test files share: waiting for a condition, Chromium, and the secret page's
encryption done in Python (what the page does in the browser)."""

from __future__ import annotations

import json
import os
import time
import urllib.parse
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

import agentkit

# agentkit's configuration variables: tests set what they need, nothing comes from the shell
CONFIG_VARS = (
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "AGENTKIT_MODEL",
    "TELEGRAM_BOT_TOKEN",
    "AGENTKIT_TELEGRAM_ALLOW",
    "AGENTKIT_WEB_TOKEN",
    "AGENTKIT_PUBLIC_URL",
    "AGENTKIT_SECRET_KEY",
    "AGENTKIT_LOG_LEVEL",
)


def clear_config(monkeypatch: pytest.MonkeyPatch, names: tuple[str, ...] = CONFIG_VARS) -> None:
    for name in names:
        monkeypatch.delenv(name, raising=False)


CHROMIUM = "/usr/bin/chromium"  # Debian's; the tests never download a browser
CHROMIUM_ARGS = [
    "--headless=new",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",  # this machine's closed network refuses them
    "--disable-component-update",
    "--disable-sync",
]


def wait_until(condition: Callable[[], object], timeout: float = 30.0, what: str = "") -> object:
    """Poll `condition` (for what cannot be awaited, like another process's rows or a file
    growing) until it is truthy; fail the test after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what or condition}")


def seal(url: str, values: dict[str, str], names: list[str] | None = None) -> str:
    """The blob the secret page makes for the request behind `url` (its fragment): ECDH
    P-256, HKDF-SHA256, AES-256-GCM with the request id and field names as associated
    data. `names` overrides the field names bound in (to forge a mismatch)."""
    params = dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(url).fragment))
    request_id = params["id"]
    names = names or [f["name"] for f in json.loads(params["fields"])]
    peer = ec.EllipticCurvePublicKey.from_encoded_point(
        ec.SECP256R1(), agentkit.unb64url(params["key"])
    )
    mine = ec.generate_private_key(ec.SECP256R1())
    key = HKDF(hashes.SHA256(), 32, salt=request_id.encode(), info=agentkit.SECRET_INFO).derive(
        mine.exchange(ec.ECDH(), peer)
    )
    iv = os.urandom(12)
    sealed = AESGCM(key).encrypt(
        iv, json.dumps(values).encode(), agentkit.secret_aad(request_id, names)
    )
    public = mine.public_key().public_bytes(
        serialization.Encoding.X962, serialization.PublicFormat.UncompressedPoint
    )
    parts = [request_id, *(agentkit.b64url(p) for p in (public, iv, sealed))]
    return "agentkit-secret:v1." + ".".join(parts)
