"""Request bodies are bounded (hardening issue, item 3): an oversized body is refused with a 413
before the gateway reads it whole, with or without a Content-Length."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from deployments.gateway.api import GUARDS, api


@pytest.fixture
def client() -> Iterator[TestClient]:
    GUARDS.max_body_bytes = 4096
    try:
        yield TestClient(api)
    finally:
        GUARDS.max_body_bytes = None


def test_a_body_over_the_limit_is_a_413_naming_the_limit(client: TestClient) -> None:
    big = "A" * 10_000
    r = client.post("/infer", json={"image_b64": big, "prompt": "x"})
    assert r.status_code == 413 and "max_body_bytes" in r.json()["error"]["message"]
    r = client.post(
        "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": big}]}
    )
    assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"


def test_a_streamed_body_without_length_is_cut_off_at_the_limit(client: TestClient) -> None:
    def chunks() -> Iterator[bytes]:
        for _ in range(100):
            yield b"A" * 1000

    r = client.post("/infer", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_a_body_under_the_limit_goes_through(client: TestClient) -> None:
    assert client.post("/no-such-path", content=b"A" * 4000).status_code == 404  # reached the app
    assert client.post("/no-such-path", content=b"A" * 5000).status_code == 413
