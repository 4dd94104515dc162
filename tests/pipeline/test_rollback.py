"""What the DAG's rollback task decides before it touches any target (no engine needed)."""

from turbo_core.pipeline import tasks


def test_rollback_says_what_it_can_and_cannot_undo(tmp_path):
    prep = {"work_dir": str(tmp_path), "deploy_target": "docker"}
    assert tasks.rollback(prep, None)["reason"] == "nothing was deployed by this run"
    done = tasks.rollback(prep, {"rolled_back": True, "image": "repo:new"})
    assert done["action"] == "none" and done["reason"] == "the rollout already rolled back"
    first = tasks.rollback(prep, {"image": "repo:new", "details": {}})  # verify failed, no v0
    assert first["action"] == "none"
    assert first["reason"] == ("no earlier release to go back to: the new deployment (repo:new) "
                               "stays up")
