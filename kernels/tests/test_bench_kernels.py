"""`turbo bench kernels` output contract (interpreter smoke mode on CPU, full mode on GPU)."""

import json

import pytest
import torch

from turbo_core.cli import main


@pytest.mark.skipif(torch.cuda.is_available(), reason="the GPU run is kernels/device_check.sh's job")
def test_smoke_mode_writes_json_and_says_so(tmp_path, capsys):
    out = tmp_path / "k.json"
    assert main(["bench", "kernels", "--json", str(out)]) == 0
    doc = json.loads(out.read_text())
    assert doc["mode"].startswith("interpreter-smoke") and doc["device"]["type"] == "cpu"
    assert doc["prefill"] and doc["decode"]
    for r in doc["prefill"]:
        assert r["turbo_ms"] > 0 and r["sdpa_fp16_ms"] > 0 and r["speedup_vs_sdpa"] > 0
    assert doc["decode"][0]["kv_bytes_fp16"] / doc["decode"][0]["kv_bytes_int4"] > 3.5
    assert "not performance" in capsys.readouterr().out
