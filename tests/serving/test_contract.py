"""The published OpenAPI document says what the server does: a real ``turbo serve`` process on
127.0.0.1, its own ``/openapi.json``, and a schema fuzzer (schemathesis, every check) that
sends documented and undocumented requests and compares each answer with the document: no 5xx,
no undocumented status or content type, no schema-valid request refused, no schema-invalid
one accepted, every response body as documented."""

import json
import shutil
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from turbo_core.http import free_port, stop_group, wait_ok

MAX_NEW = 64
# a minimal chat template: the tiny model's tokenizer has none, and the chat route is only in
# the document of a server whose tokenizer has one
CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _serve(model_dir: Path, log: Path):
    port = free_port()
    proc = subprocess.Popen(
        [str(Path(sys.executable).parent / "turbo"), "serve", "--model", str(model_dir),
         "--variant", "turbo-int4", "--port", str(port), "--no-compile",
         "--max-new-tokens", str(MAX_NEW)],
        stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    wait_ok(f"{url}/health", 120, lambda: None if proc.poll() is None else log.read_text()[-2000:])
    return proc, url


@pytest.fixture(scope="module")
def chat_server(tiny_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("contract")
    model = root / "tiny-chat"
    shutil.copytree(tiny_dir, model)
    cfg = json.loads((model / "tokenizer_config.json").read_text())
    (model / "tokenizer_config.json").write_text(json.dumps(cfg | {"chat_template": CHAT_TEMPLATE}))
    proc, url = _serve(model, root / "serve.log")
    yield url, root
    stop_group(proc)


def _document(url: str) -> dict:
    with urllib.request.urlopen(f"{url}/openapi.json", timeout=30) as r:
        return json.loads(r.read())


def test_the_document_states_the_rules_the_server_applies(chat_server):
    url, _ = chat_server
    doc = _document(url)
    schemas = doc["components"]["schemas"]
    prompt = schemas["CompletionRequest"]["properties"]["prompt"]["anyOf"]
    assert {"type": "string", "minLength": 1} in prompt  # one prompt: a string ...
    (listed,) = [b for b in prompt if b["type"] == "array"]
    assert listed["minItems"] == listed["maxItems"] == 1  # ... or a list holding exactly one
    for field in ("stream", "ignore_eos"):
        assert schemas["CompletionRequest"]["properties"][field]["type"] == "boolean"
    (bounded,) = [b for b in schemas["ChatRequest"]["properties"]["max_completion_tokens"]["anyOf"]
                  if b["type"] == "integer"]
    assert (bounded["minimum"], bounded["maximum"]) == (1, MAX_NEW)  # this server's limit
    completions = doc["paths"]["/v1/completions"]["post"]["responses"]
    assert {"200", "400", "401", "404", "422", "429", "500", "503", "504"} <= set(completions)
    assert completions["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorBody")
    assert "text/event-stream" in completions["200"]["content"]
    assert list(doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == ["text/plain"]
    with urllib.request.urlopen(f"{url}/metrics", timeout=30) as r:
        assert r.headers["Content-Type"].startswith("text/plain")


def test_schema_fuzz_finds_no_mismatch(chat_server):
    """A bounded fuzz (100 examples per operation, fixed seed: the same cases every run)."""
    url, root = chat_server
    junit = root / "schemathesis.xml"
    res = subprocess.run(
        [str(Path(sys.executable).parent / "schemathesis"), "run", f"{url}/openapi.json",
         "--checks", "all", "--max-examples", "100", "--seed", "1", "--no-color",
         "--output-sanitize", "false", "--report", "junit", "--report-junit-path", str(junit)],
        capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-6000:] + res.stderr[-2000:]
    assert "No issues found" in res.stdout and junit.is_file()
    generated = int(res.stdout.split(" generated")[0].split()[-1])
    assert generated >= 300, res.stdout[-1500:]  # it did fuzz: every operation, many cases


def test_without_a_chat_template_the_document_offers_no_chat(tiny_dir, tmp_path):
    proc, url = _serve(tiny_dir, tmp_path / "serve.log")
    try:
        assert "/v1/chat/completions" not in _document(url)["paths"]
        body = {"messages": [{"role": "user", "content": "hi"}]}
        req = urllib.request.Request(f"{url}/v1/chat/completions", method="POST",
                                     data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as exc:
            urllib.request.urlopen(req, timeout=30)
        assert exc.value.code == 400
        assert "no chat template" in json.loads(exc.value.read())["error"]["message"]
    finally:
        stop_group(proc)
