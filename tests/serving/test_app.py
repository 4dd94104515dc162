"""The OpenAI-compatible app in-process on a tiny model: endpoints, streaming, chat, API key,
bad input, overload."""

import json

import pytest
from fastapi.testclient import TestClient

from turbo_core.serving.app import create_app
from turbo_core.serving.engine import Engine, Limits
from turbo_core.serving.scheduler import QueueFull


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine.from_files(str(tiny_dir), "turbo-int4", None)


@pytest.fixture
def client(engine):
    with TestClient(create_app(engine, Limits(max_prompt_tokens=64, max_new_tokens=32))) as c:
        yield c


def test_health_ready_models(client, engine):
    assert client.get("/health").json() == {"status": "ok"}
    r = client.get("/ready")
    assert r.status_code == 200 and r.json() == {"ready": True, "model": engine.model_id,
                                                  "probe": "length"}
    models = client.get("/v1/models").json()
    assert models["object"] == "list" and models["data"][0]["id"] == engine.model_id


def test_completion_is_greedy_at_temperature_zero(client, engine):
    body = {"model": engine.model_id, "prompt": "The attention", "max_tokens": 8, "temperature": 0}
    a = client.post("/v1/completions", json=body).json()
    ids = engine.encode("The attention")
    cache = engine.new_cache()
    seq = cache.add_sequence()
    logits, want = engine.forward(cache, [seq], [ids], [0]), []
    while len(want) < 8 and int(logits[0].argmax()) != engine.eos_token_id:
        want.append(int(logits[0].argmax()))
        logits = engine.forward(cache, [seq], [[want[-1]]], [len(ids) + len(want) - 1])
    assert a["object"] == "text_completion" and a["choices"][0]["text"] == engine.decode(want)
    assert a["usage"] == {"prompt_tokens": len(ids), "completion_tokens": len(want),
                          "total_tokens": len(ids) + len(want)}
    assert a["choices"][0]["finish_reason"] == ("length" if len(want) == 8 else "stop")
    seeded = [client.post("/v1/completions", json=body | {"temperature": 1.0, "top_p": 0.9,
                                                           "seed": s}).json() for s in (3, 3, 4)]
    assert seeded[0]["choices"][0]["text"] == seeded[1]["choices"][0]["text"]


def test_streaming_matches_non_streaming_and_reports_usage(client):
    body = {"prompt": ["The attention"], "max_tokens": 6}
    whole = client.post("/v1/completions", json=body).json()
    with client.stream("POST", "/v1/completions",
                       json=body | {"stream": True, "stream_options": {"include_usage": True}}) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"] == whole["usage"]
    text = "".join(c["choices"][0]["text"] for c in chunks[:-1])
    assert text == whole["choices"][0]["text"]
    assert chunks[-2]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]


def test_chat_completions_use_the_chat_template(engine, tiny_dir):
    tok = engine.lm.tokenizer
    tok.chat_template = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
                         "{% if add_generation_prompt %}<assistant>{% endif %}")
    try:
        with TestClient(create_app(engine, Limits(max_prompt_tokens=64, max_new_tokens=8))) as c:
            msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
            chat = c.post("/v1/chat/completions", json={"messages": msgs, "max_tokens": 5}).json()
            plain = c.post("/v1/completions", json={
                "prompt": "<system>Be brief.\n<user>Hi\n<assistant>", "max_tokens": 5}).json()
            with c.stream("POST", "/v1/chat/completions",
                          json={"messages": msgs, "max_completion_tokens": 5, "stream": True}) as r:
                deltas = [json.loads(x[6:]) for x in r.iter_lines()
                          if x.startswith("data: {")]
    finally:
        tok.chat_template = None
    assert chat["object"] == "chat.completion" and chat["id"].startswith("chatcmpl-")
    assert chat["choices"][0]["message"] == {"role": "assistant",
                                             "content": plain["choices"][0]["text"]}
    assert chat["usage"] == plain["usage"]
    assert deltas[0]["object"] == "chat.completion.chunk"
    assert "".join(d["choices"][0]["delta"]["content"] for d in deltas) == \
        plain["choices"][0]["text"]


def test_chat_without_a_template_is_400(client):
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "x"}]})
    assert r.status_code == 400 and "no chat template" in r.json()["error"]["message"]


@pytest.mark.parametrize(
    ("path", "body", "status", "message"),
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 422, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "max_tokens": 33}, 422, "exceeds the limit 32"),
        ("/v1/completions", {"prompt": "x", "temperature": 5}, 422, "temperature"),
        ("/v1/completions", {"prompt": ["a", "b"]}, 422, "exactly one prompt"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 422, "n"),
        ("/v1/completions", {"max_tokens": 3}, 422, "prompt"),
        ("/v1/completions", {"prompt": "x", "stop": ""}, 422, "stop: a non-empty string"),
        ("/v1/completions", {"prompt": []}, 422, "exactly one prompt"),
        ("/v1/completions", {"prompt": "x", "ignore_eos": 0}, 422, "ignore_eos"),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                                  "stream": "yes"}, 422, "stream"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "5"}, 422, "must be a JSON number"),
        ("/v1/completions", {"prompt": "word " * 200}, 400, "the limit is 64"),
        ("/v1/completions", {"prompt": "x", "model": "gpt-4"}, 404, "not served here"),
        ("/v1/chat/completions", {"messages": []}, 422, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, 422, "role"),
    ],
)
def test_bad_requests_get_clear_4xx(client, path, body, status, message):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    assert message in r.json()["error"]["message"]


def test_malformed_json_is_400(client):
    r = client.post("/v1/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_full_queue_is_429_and_too_large_is_400(engine, monkeypatch):
    limits = Limits(max_new_tokens=8, kv_budget=engine.bytes_for(40))
    with TestClient(create_app(engine, limits)) as c:
        too_large = c.post("/v1/completions", json={"prompt": "word " * 30, "max_tokens": 8})
        assert too_large.status_code == 400 and "KV budget" in too_large.json()["error"]["message"]
        scheduler = c.app.state.scheduler

        def full(*args, **kwargs):
            raise QueueFull("server busy: 16 sequences running and 64 waiting (queue bound 64)")

        monkeypatch.setattr(scheduler, "submit", full)
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2})
        assert r.status_code == 429 and r.headers["retry-after"] == "1"
        assert "queue bound" in r.json()["error"]["message"]
        text = c.get("/metrics").text
    assert 'turbo_requests_total{endpoint="/v1/completions",status="429"} 1.0' in text
    assert 'turbo_requests_total{endpoint="/v1/completions",status="400"} 1.0' in text


def test_api_key_guards_v1_but_not_probes(engine):
    with TestClient(create_app(engine, Limits(max_new_tokens=4), api_key="s3cret")) as c:
        body = {"prompt": "The", "max_tokens": 2}
        assert c.post("/v1/completions", json=body).status_code == 401
        wrong = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer nope"})
        assert wrong.status_code == 401 and "API key" in wrong.json()["error"]["message"]
        assert c.get("/v1/models").status_code == 401
        ok = c.post("/v1/completions", json=body, headers={"Authorization": "Bearer s3cret"})
        assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] >= 1
        # the header the Kubernetes Service proxy forwards (it keeps Authorization)
        assert c.get("/v1/models", headers={"X-API-Key": "s3cret"}).status_code == 200
        assert c.get("/v1/models", headers={"X-API-Key": "s3cre"}).status_code == 401
        assert c.get("/health").status_code == 200 and c.get("/ready").status_code == 200
        assert 'turbo_requests_total{endpoint="/v1/completions",status="401"} 2.0' in \
            c.get("/metrics").text


def test_limits_and_engine_refuse_misuse(tiny_dir):
    with pytest.raises(ValueError, match="invalid server limits"):
        Limits(max_batch=0)
    with pytest.raises(ValueError, match="needs a bit plan"):
        Engine.from_files(str(tiny_dir), "turbo-mix", None)
    with pytest.raises(ValueError, match="dtype 'int8'"):
        Engine.from_files(str(tiny_dir), "turbo-int4", None, dtype="int8")
