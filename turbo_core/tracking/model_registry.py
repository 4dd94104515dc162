"""MLflow model registry: a registered model per base model, versions for variants that pass
their gates, aliases ``challenger`` (passed gates) and ``champion`` (deployed and verified).

A version holds the bit plan and the variant config, and names the base weights by hash; it
never copies them. ``mlflow.pyfunc.load_model("models:/NAME@champion")`` rebuilds a working
TurboAttention model from the base weights on this machine (checked against the hash).
"""

from __future__ import annotations

import json
import re
import tempfile
from pathlib import Path

import mlflow.pyfunc

CHALLENGER = "challenger"
CHAMPION = "champion"


def registered_name(model_name: str) -> str:
    return "turbo-" + re.sub(r"[^A-Za-z0-9._-]+", "-", model_name).strip("-")


class TurboAttentionModel(mlflow.pyfunc.PythonModel):
    """pyfunc: prompts (list of str, or a DataFrame with a ``prompt`` column) → completions."""

    def load_context(self, context) -> None:
        from turbo_core.attention.plan import BitPlan
        from turbo_core.attention.variants import Variant
        from turbo_core.hf import models
        from turbo_core.hf.attention import enable

        cfg = context.model_config
        self.lm = models.load(cfg["base_model"])
        if self.lm.weights_sha256 != cfg["weights_sha256"]:
            raise ValueError(f"base weights at {self.lm.path} have sha256 {self.lm.weights_sha256}, "
                             f"the registered variant needs {cfg['weights_sha256']}")
        # the variant as registered (its logged settings), never today's registry entry by name
        self.variant = Variant.from_params(json.loads(Path(context.artifacts["variant"]).read_text()))
        self.plan = BitPlan.load(context.artifacts["plan"])
        self.plan.check_compatible(self.lm.shape)
        enable(self.lm.model, self.variant.math)
        self.max_new_tokens = int(cfg.get("max_new_tokens", 32))

    def new_cache(self):
        from turbo_core.hf.cache import TurboCache

        if not self.variant.quantized_cache:
            return None
        return TurboCache.for_model(self.lm.model, self.lm.shape, self.plan, self.variant.kv)

    def predict(self, context, model_input, params=None) -> list[str]:
        import torch

        if hasattr(model_input, "columns"):  # pandas DataFrame: a "prompt" column, else the first
            column = "prompt" if "prompt" in model_input.columns else model_input.columns[0]
            prompts = [str(p) for p in model_input[column]]
        else:
            prompts = [str(p) for p in model_input]
        max_new = int((params or {}).get("max_new_tokens", self.max_new_tokens))
        tok = self.lm.tokenizer
        out = []
        with torch.no_grad():
            for prompt in prompts:
                ids = tok(prompt, return_tensors="pt")["input_ids"]
                gen = self.lm.model.generate(ids, attention_mask=torch.ones_like(ids),
                                             max_new_tokens=max_new, do_sample=False,
                                             cache=self.new_cache(), pad_token_id=tok.eos_token_id)
                out.append(tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True))
        return out


def register(*, model_name: str, base_model: str, weights_sha256: str,
             variant_params: dict, plan_path: str | Path, metrics: dict[str, float]) -> str:
    """Log the pyfunc (plan + variant, no weights) in the active run and register it; the new
    version gets the metrics as tags and the ``challenger`` alias. Returns the version."""
    from mlflow import MlflowClient
    from mlflow.models import infer_signature

    name = registered_name(model_name)
    _discard_incomplete(name)
    with tempfile.TemporaryDirectory() as tmp:
        variant_path = Path(tmp) / "variant.json"
        variant_path.write_text(json.dumps(variant_params, indent=2))
        info = mlflow.pyfunc.log_model(
            name="turbo_model",
            python_model=TurboAttentionModel(),
            artifacts={"plan": str(plan_path), "variant": str(variant_path)},
            model_config={"base_model": base_model, "weights_sha256": weights_sha256},
            signature=infer_signature(["a prompt"], ["a completion"], params={"max_new_tokens": 32}),
            pip_requirements=["turbo-attention-pipeline"],
            registered_model_name=name,
        )
    client = MlflowClient()
    version = str(info.registered_model_version)
    tags = {f"metric.{k}": f"{v:.6g}" for k, v in metrics.items()}
    tags |= {"validation_status": "passed_gates", "variant": variant_params["variant"],
             "weights_sha256": weights_sha256}
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, CHALLENGER, version)
    return version


def _discard_incomplete(name: str) -> None:
    """Delete the versions an earlier try of this Airflow task left half-registered: created,
    then the tracking server went away before their tags and alias were set (every complete
    version has ``validation_status``). Only this Airflow run's versions of this variant: a
    variant registering beside it in the same run is left alone."""
    from mlflow import MlflowClient

    active = mlflow.active_run()
    tags = active.data.tags if active is not None else {}
    airflow_run, variant = tags.get("airflow.run_id"), tags.get("turbo.variant")
    if not airflow_run or not variant:
        return
    client = MlflowClient()
    for version in client.search_model_versions(f"name='{name}'"):
        if "validation_status" in version.tags or version.run_id == active.info.run_id:
            continue
        origin = client.get_run(version.run_id).data.tags
        if origin.get("airflow.run_id") == airflow_run and origin.get("turbo.variant") == variant:
            client.delete_model_version(name, version.version)


def alias_version(model_name: str, alias: str):
    """The model version behind ``alias``, or ``None``."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    try:
        return MlflowClient().get_model_version_by_alias(registered_name(model_name), alias)
    except MlflowException as exc:
        if exc.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            return None
        raise


def champion_metrics(model_name: str) -> dict[str, float] | None:
    """Metrics of the run behind the ``champion`` alias (the gates' relative baseline)."""
    from mlflow import MlflowClient

    version = alias_version(model_name, CHAMPION)
    if version is None:
        return None
    return dict(MlflowClient().get_run(version.run_id).data.metrics)


def promote(model_name: str, version: str) -> None:
    """Make ``version`` the champion (after deployment and verification)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = registered_name(model_name)
    client.set_registered_model_alias(name, CHAMPION, version)
    client.set_model_version_tag(name, version, "validation_status", "deployed_verified")


def versions(model_name: str) -> list[dict]:
    """Every registered version of ``model_name``'s variants, newest first: its aliases,
    variant, status tag, run and the image it was deployed as (when it was)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    name = registered_name(model_name)
    aliases: dict[str, list[str]] = {}
    for model in client.search_registered_models(f"name='{name}'"):
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
    rows = []
    for v in client.search_model_versions(f"name='{name}'"):
        tags = client.get_run(v.run_id).data.tags if v.run_id else {}
        image = tags.get("rollout.image", "")
        if tags.get("rollout.image_digest") and "@" not in image:
            image = f"{image.rsplit(':', 1)[0]}@{tags['rollout.image_digest']}"
        rows.append({"version": str(v.version), "aliases": sorted(aliases.get(str(v.version), [])),
                     "variant": v.tags.get("variant", ""),
                     "status": v.tags.get("validation_status", "incomplete"),
                     "run_id": v.run_id, "image": image})
    return sorted(rows, key=lambda r: int(r["version"]), reverse=True)


def demote(model_name: str) -> str | None:
    """Take the ``champion`` alias off its version (tagged ``demoted``); the version it was on,
    or None when there was no champion. The gates' champion comparison then has no baseline
    until a version is promoted again."""
    from mlflow import MlflowClient

    version = alias_version(model_name, CHAMPION)
    if version is None:
        return None
    client = MlflowClient()
    name = registered_name(model_name)
    client.delete_registered_model_alias(name, CHAMPION)
    client.set_model_version_tag(name, str(version.version), "validation_status", "demoted")
    return str(version.version)
