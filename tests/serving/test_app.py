"""The OpenAI-compatible app in-process on a tiny model: endpoints, streaming, bad input,
overload."""

import asyncio
import json

import pytest
from fastapi.testclient import TestClient

from turbo_core.serving.app import create_app
from turbo_core.serving.engine import Engine, Limits


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.from_files(str(tiny_dir), "turbo-int4", None)


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, Limits(max_prompt_tokens=64, max_new_tokens=32,
                                              max_queue=0))) as c:
        yield c


def test_health_ready_models(client, engine):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json()["ready"] is True
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == engine.model_id


def test_completion_is_deterministic_at_temperature_zero(client, engine):
    body = {"model": engine.model_id, "prompt": "The attention", "max_tokens": 8,
            "temperature": 0}
    a = client.post("/v1/completions", json=body).json()
    b = client.post("/v1/completions", json=body).json()
    assert a["object"] == "text_completion" and a["choices"][0]["text"] == b["choices"][0]["text"]
    assert a["usage"]["completion_tokens"] <= 8 and a["usage"]["prompt_tokens"] > 0
    assert a["choices"][0]["finish_reason"] in ("length", "stop")
    sampled = client.post("/v1/completions", json=body | {"temperature": 1.0, "top_p": 0.9,
                                                          "seed": 3}).json()
    assert sampled["choices"][0]["finish_reason"] in ("length", "stop")


def test_streaming_matches_non_streaming(client):
    body = {"prompt": ["The attention"], "max_tokens": 6}
    whole = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    with client.stream("POST", "/v1/completions", json=body | {"stream": True}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == whole
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")


@pytest.mark.parametrize(
    ("body", "status", "message"),
    [
        ({"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
        ({"prompt": "x", "max_tokens": 33}, 422, "exceeds the limit 32"),
        ({"prompt": "x", "temperature": 5}, 422, "temperature"),
        ({"prompt": ["a", "b"]}, 422, "exactly one prompt"),
        ({"prompt": "x", "n": 2}, 422, "n"),
        ({"max_tokens": 3}, 422, "prompt"),
        ({"prompt": "word " * 200}, 400, "the limit is 64"),
        ({"prompt": "x", "model": "gpt-4"}, 404, "not served here"),
    ],
)
def test_bad_requests_get_clear_4xx(client, body, status, message):
    r = client.post("/v1/completions", json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_malformed_json_is_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_overload_is_429_and_metrics_count_it(client):
    app = client.app
    asyncio.run(app.state.slots.acquire())  # every generation slot busy, queue bound 0
    try:
        r = client.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
    finally:
        app.state.slots.release()
    assert r.status_code == 429 and r.headers["retry-after"] == "1"
    client.post("/v1/completions", json={"prompt": "The", "max_tokens": 3})
    text = client.get("/metrics").text
    assert 'turbo_requests_total{endpoint="/v1/completions",status="429"} 1.0' in text
    assert "turbo_generated_tokens_total" in text and "turbo_request_latency_seconds_bucket" in text
    assert "turbo_kv_cache_bytes" in text


def test_limits_and_engine_refuse_misuse(tiny_dir):
    with pytest.raises(ValueError, match="invalid server limits"):
        Limits(max_concurrency=0)
    with pytest.raises(ValueError, match="needs a bit plan"):
        Engine.from_files(str(tiny_dir), "turbo-mix", None)
