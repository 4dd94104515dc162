"""Retake the README's screenshots: a small pipeline run into a fresh $TURBO_HOME, the real UIs
(scripts/ui.sh: `airflow standalone` and `mlflow server`) over its stores, and headless
Chromium (Debian's, driven by Playwright) on three pages: the trigger form of turbo_nightly,
its grid, and MLflow's comparison of the run's variants.

    scripts/screenshots.sh                       # SmolLM2, into docs/images/
    scripts/screenshots.sh --model PATH --out DIR  # another model (the tests: the tiny one)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from turbo_core.http import free_port, stop_group, wait_ok  # noqa: E402  (the checkout, not an install)

# small sizes: the pictures show the UI, not the measurement
CONF = {"eval_tokens": 1024, "eval_window": 256, "calib_tokens": 512, "speed_context": 128,
        "speed_batch": 2, "retrieval_lengths": [512], "retrieval_samples": 1}
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
VIEW = {"width": 1400, "height": 900}
TALL = {"width": 1400, "height": 1300}  # MLflow's comparison: run names above the metrics


def say(msg: str) -> None:
    print(f"[screenshots] {msg}", file=sys.stderr, flush=True)


def run_pipeline(env: dict, model: str, conf: dict) -> dict:
    out = Path(env["TURBO_HOME"]) / "run.json"
    say(f"pipeline run on {model} (deploy target none) ...")
    subprocess.run([sys.executable, "-m", "turbo_core.cli", "pipeline", "run", "--model", model,
                    "--variants", "turbo-int4", "turbo-mix", "--deploy-target", "none",
                    "--conf", json.dumps(conf), "--json", str(out)], env=env, check=True,
                   stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def start_uis(env: dict, log: Path) -> tuple[subprocess.Popen, str, str]:
    af, ml = free_port(), free_port()
    env = env | {"AIRFLOW_PORT": str(af), "MLFLOW_PORT": str(ml),
                 # no login page in the pictures, no cron run beside the one shown
                 "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "True",
                 "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False"}
    proc = subprocess.Popen([str(ROOT / "scripts" / "ui.sh")], env=env, cwd=ROOT,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)

    def alive():
        return None if proc.poll() is None else log.read_text()[-3000:]

    airflow, mlflow = f"http://127.0.0.1:{af}", f"http://127.0.0.1:{ml}"
    say("starting the Airflow and MLflow UIs ...")
    wait_ok(f"{airflow}/api/v2/monitor/health", 300, alive)
    wait_ok(f"{mlflow}/health", 120, alive)
    return proc, airflow, mlflow


def stop(proc: subprocess.Popen) -> None:
    stop_group(proc, timeout_s=90)  # SIGTERM to the group: what Ctrl-C does to scripts/ui.sh


def compare_url(mlflow: str, tracking_uri: str, model_name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=tracking_uri)
    exp = client.get_experiment_by_name(f"turbo-attention/{model_name}")
    runs = client.search_runs([exp.experiment_id], "tags.`turbo.stage` = 'evaluate'")
    ids = json.dumps([r.info.run_id for r in runs])
    return f"{mlflow}/#/compare-runs?runs={ids}&experiments={json.dumps([exp.experiment_id])}"


def shoot(airflow: str, run_id: str, mlflow_url: str, out: Path, chromium: str) -> list[Path]:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    shots = []
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport=VIEW, device_scale_factor=1)
        page.set_default_timeout(120_000)
        # the dag-processor parses dags/ a few seconds after start: reload until it is listed
        for _ in range(60):
            page.goto(f"{airflow}/dags/turbo_nightly", wait_until="networkidle")
            if page.get_by_role("button", name="Trigger").count():
                break
            time.sleep(2)
        page.get_by_role("button", name="Trigger").first.click()
        page.get_by_role("dialog").wait_for()
        page.get_by_text("Run Parameters").first.wait_for()
        page.wait_for_timeout(1500)
        shots.append(out / "airflow-trigger.png")
        page.screenshot(path=shots[-1])  # the form's first fields (the dialog scrolls)
        say(f"wrote {shots[-1]}")
        page.goto(f"{airflow}/dags/turbo_nightly/runs/{quote(run_id, safe='')}",
                  wait_until="networkidle")
        page.get_by_text("summary").first.wait_for()
        page.wait_for_timeout(1500)
        shots.append(out / "airflow-grid.png")
        page.screenshot(path=shots[-1])
        say(f"wrote {shots[-1]}")
        page.goto(mlflow_url, wait_until="load")  # MLflow's UI polls: never network-idle
        page.get_by_text("turbo-int4", exact=False).first.wait_for()
        page.wait_for_timeout(2000)
        # the runs' names over their metrics: the assistant panel closed, the plots and the
        # parameters folded, the page taller than the others
        if page.get_by_role("button", name="Close").count():
            page.get_by_role("button", name="Close").first.click()
        for section in ("Visualizations", "Parameters"):
            page.get_by_role("button", name=section, exact=True).first.click()
        page.set_viewport_size(TALL)
        page.wait_for_timeout(1500)
        shots.append(out / "mlflow-compare.png")
        page.screenshot(path=shots[-1], full_page=False)
        say(f"wrote {shots[-1]}")
        browser.close()
    return shots


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2", help="as `turbo pipeline run --model`")
    parser.add_argument("--out", default=str(ROOT / "docs" / "images"))
    parser.add_argument("--conf", default=json.dumps(CONF), help="pipeline parameters (JSON)")
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.exit(2, "no Chromium on this machine (Debian package chromium; "
                       "scripts/screenshots.sh installs it when run as root)\n")
    home = Path(tempfile.mkdtemp(prefix="turbo-screenshots-"))
    env = os.environ | {"TURBO_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow")}
    env.pop("MLFLOW_TRACKING_URI", None)
    try:
        run = run_pipeline(env, args.model, json.loads(args.conf))
        model_name = run["summary"]["model"]
        proc, airflow, mlflow = start_uis(env, home / "ui.log")
        try:
            url = compare_url(mlflow, f"sqlite:///{home / 'mlflow' / 'mlflow.db'}", model_name)
            shoot(airflow, run["run_id"], url, Path(args.out), chromium)
        finally:
            stop(proc)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
