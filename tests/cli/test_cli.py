"""The ``turbo`` command line and the attention benchmark's output contract."""

import json
import subprocess
import sys

import pytest

from turbo_core.cli import main


def test_bench_attention_writes_table_json_and_markdown(tmp_path, capsys):
    out_json, out_md = tmp_path / "b.json", tmp_path / "b.md"
    rc = main(["bench", "attention", "--quick", "--batch", "2", "--seq", "32", "--embed", "64",
               "--repeats", "2", "--case", "turbo-sas-int8qk", "--case", "turbo-exact",
               "--json", str(out_json), "--markdown", str(out_md)])
    assert rc == 0
    doc = json.loads(out_json.read_text())
    assert doc["shape"]["batch"] == 2 and doc["shape"]["seq"] == 32 and doc["shape"]["heads"] == 4
    names = [r["name"] for r in doc["results"]]
    assert names == ["nn.MultiheadAttention", "sdpa", "turbo-sas-int8qk", "turbo-exact"]
    for r in doc["results"]:
        assert r["median_ms"] > 0 and r["ratio_vs_mha"] > 0
        expect = doc["results"][0]["median_ms"] / r["median_ms"]
        assert r["ratio_vs_mha"] == pytest.approx(expect)
    assert doc["results"][0]["ratio_vs_mha"] == pytest.approx(1.0)
    exact = doc["results"][3]
    assert exact["cosine_vs_mha"] > 0.99999  # the exact config is MHA's math
    assert doc["device"]["type"] == "cpu" and doc["device"]["torch"]
    # each row names what computed it: the C++ op for INT8 Q·Kᵀ + SAS, SDPA for exact math
    assert [r["backend"] for r in doc["results"]] == ["torch", "sdpa", "cpu", "sdpa"]
    printed = capsys.readouterr().out
    assert "nn.MultiheadAttention" in printed and "vs MHA" in printed
    assert out_md.read_text().startswith("# Attention benchmark") and "| contender" in out_md.read_text()


def test_bad_arguments_exit_with_a_clear_message(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        main(["bench", "attention", "--quick", "--embed", "30", "--json", str(tmp_path / "x.json")])
    assert exc.value.code == 2
    assert "not divisible by heads" in capsys.readouterr().err
    assert not (tmp_path / "x.json").exists()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "attention", "--quick", "--case", "nope"])
    assert "unknown benchmark case" in capsys.readouterr().err


def test_console_script_is_installed():
    res = subprocess.run([sys.executable, "-m", "turbo_core.cli", "bench", "attention", "--help"],
                         capture_output=True, text=True, check=True)
    assert "article" in res.stdout


def test_bench_subcommands_are_the_documented_ones(capsys):
    """One load client: ``turbo bench serve --url`` measures a running server, so the older
    one-at-a-time ``turbo bench load`` is gone; every subcommand is documented, none more."""
    import re
    from pathlib import Path

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    listed = re.search(r"\{([a-z,-]+)\}", capsys.readouterr().out).group(1).split(",")
    readme = (Path(__file__).resolve().parents[2] / "docs" / "development.md").read_text()
    documented = re.search(r"`turbo bench ([a-z |\\-]+)`", readme).group(1)
    assert sorted(listed) == sorted(w.strip() for w in documented.split("\\|"))
    assert "load" not in listed
    with pytest.raises(SystemExit) as exc:
        main(["bench", "load", "--url", "http://127.0.0.1:9"])
    assert exc.value.code == 2 and "invalid choice: 'load'" in capsys.readouterr().err
