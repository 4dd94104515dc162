"""docs/operations.md's commands work: after a real pipeline run on the tiny model, every shell
block the runbook marks ``<!-- runbook: run -->`` runs, in order, as an operator would paste
it; every other shell block says why it is not run here."""

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from small import PIPELINE_CONF

ROOT = Path(__file__).resolve().parents[1]
RUNBOOK = ROOT / "docs" / "operations.md"


def _blocks() -> list[tuple[str, str]]:
    """(marker, code) of every bash block, the marker being the comment just above it."""
    text = RUNBOOK.read_text()
    out = []
    for m in re.finditer(r"(?:<!-- runbook: (.+?) -->\n)?```bash\n(.*?)```", text, re.S):
        out.append((m.group(1) or "", m.group(2)))
    return out


def test_every_shell_block_is_run_or_says_why_not():
    blocks = _blocks()
    assert blocks and any(marker == "run" for marker, _ in blocks)
    for marker, code in blocks:
        assert marker == "run" or re.fullmatch(r"not run here: .{10,}", marker), (marker, code)


@pytest.mark.slow
def test_the_runbook_commands_run_after_a_pipeline_run(tmp_path, tiny_dir):
    from mlflow import MlflowClient

    home = tmp_path / "turbo"
    bin_dir = Path(sys.executable).parent
    env = os.environ | {"TURBO_HOME": str(home), "PATH": f"{bin_dir}:{os.environ['PATH']}",
                        "AIRFLOW_HOME": str(home / "airflow"),
                        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                        "AIRFLOW__CORE__LOAD_EXAMPLES": "False"}
    env.pop("MLFLOW_TRACKING_URI", None)  # the runbook's default: the local store under TURBO_HOME
    out = tmp_path / "run.json"
    res = subprocess.run([sys.executable, "-m", "turbo_core.cli", "pipeline", "run", "--model",
                          str(tiny_dir), "--variants", "turbo-int4", "--deploy-target", "none",
                          "--conf", json.dumps(PIPELINE_CONF), "--json", str(out)],
                         env=env, capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    run = json.loads(out.read_text())
    uri = f"sqlite:///{home / 'mlflow' / 'mlflow.db'}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    name = f"turbo-{tiny_dir.name}"
    (version,) = client.search_model_versions(f"name='{name}'")
    env |= {"MODEL": tiny_dir.name, "VERSION": str(version.version), "RUN_ID": run["run_id"]}
    env.pop("AIRFLOW_HOME")  # the runbook derives it from TURBO_HOME, as scripts/ui.sh does

    printed = []
    for marker, code in _blocks():
        if marker != "run":
            continue
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", code], env=env, cwd=ROOT,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{code}\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}"
        printed.append(done.stdout)
    listing = printed[0]
    row = rf"^\s*{version.version}\s+challenger\s+turbo-int4\s+passed_gates"
    assert re.search(row, listing, re.M), listing
    # promote then demote: no champion left, the version says it was demoted
    assert f"champion of {name}: version {version.version}" in printed[2]
    assert "no champion now" in printed[2]
    assert client.get_model_version(name, version.version).tags["validation_status"] == "demoted"
    with pytest.raises(Exception, match="champion"):
        client.get_model_version_by_alias(name, "champion")
    assert run["run_id"] in printed[1] and "cleared 4 task instance(s)" in printed[1], printed[1]
    # verify and the tasks after it (promote, rollback, summary) are back to no state
    query = ("from airflow.models.taskinstance import TaskInstance as T\n"
             "from airflow.utils.session import create_session\n"
             "with create_session() as s:\n"
             f"    rows = s.query(T).filter(T.run_id == {run['run_id']!r})\n"
             "    print(sorted(t.task_id for t in rows if t.state is None))")
    clear = subprocess.run([sys.executable, "-c", query], capture_output=True, text=True,
                           env=env | {"AIRFLOW_HOME": str(home / "airflow")}, timeout=120)
    assert clear.stdout.strip().splitlines()[-1] == str(["promote", "rollback", "summary", "verify"]), \
        clear.stdout + clear.stderr
