"""``scripts/sample.py`` on a policy checkpoint (issue 20): a policy maps observations to actions, so it is
sampled by rolling it out in its environment — one GIF per episode and ``rollouts.json`` — for VQ-BeT,
the AR-over-codes policy and the MLP baseline; codes without observations are refused with a message
that says how to act instead."""

from __future__ import annotations

import json

import pytest

from helpers import CONFIGS, train
from stage2.observation_rollouts import policy_target
from stage2.prior import load_prior
from tokenforge.sample import main as sample

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny policies: see conftest.one_thread


@pytest.fixture(scope="module")
def policies(tmp_path_factory):
    """Smoke-config checkpoints written by the train command: tokenizer, VQ-BeT, AR policy, MLP baseline."""
    root = tmp_path_factory.mktemp("policies")
    data = [f"data.params.cache_dir={root / 'cache'}"]
    runs = root / "runs"

    def run(config: str, name: str, extra: list[str]):
        train(CONFIGS / "smoke" / f"{config}.yaml", runs, ["trainer.max_steps=4", *data, *extra], name=name)
        return runs / name / "checkpoints" / "last.ckpt"

    tok = run("action_vq", "tok", [])
    uses_tok = [f"model.params.tokenizer={tok}"]
    return {"tokenizer": tok, "vqbet": run("vqbet", "vqbet", uses_tok), "action_ar": run("action_ar", "ar", uses_tok),
            "bc_mlp": run("bc_mlp", "bc", [])}


@pytest.mark.parametrize("name", ["vqbet", "action_ar", "bc_mlp"])
def test_sample_rolls_a_policy_out_and_writes_a_gif_per_episode(policies, name, tmp_path):
    ckpt = policies[name]
    assert policy_target(ckpt) is not None
    out = sample([str(ckpt), "-n", "2", "--seed", "3", "--max-steps", "30", "--out",
                  str(tmp_path / "a")])
    record = json.loads((out / "rollouts.json").read_text())
    assert record["env"] == "mountain_car" and record["history"] == 2 and record["seed"] == 3
    assert [e["policy_seed"] for e in record["episodes"]] == [3, 4]
    assert record["summary"]["episodes"] == 2 and record["max_steps"] == 30
    for episode in record["episodes"]:
        assert (out / episode["gif"]).stat().st_size > 0 and 1 <= episode["steps"] <= 30
    again = json.loads((sample([str(ckpt), "-n", "2", "--seed", "3", "--max-steps", "30",
                                "--out", str(tmp_path / "b")])
                        / "rollouts.json").read_text())
    assert again["episodes"] == record["episodes"]  # the same seed repeats the same sampled episodes


def test_sample_refuses_class_labels_for_a_policy_and_keeps_tokenizers_on_the_old_path(policies, tmp_path):
    with pytest.raises(ValueError, match="is a policy"):
        sample([str(policies["vqbet"]), "-n", "1", "--class", "0", "--out", str(tmp_path / "c")])
    assert policy_target(policies["tokenizer"]) is None
    assert policy_target(tmp_path / "missing.ckpt") is None


@pytest.mark.parametrize("name", ["vqbet", "action_ar"])
def test_codes_without_observations_name_the_rollout(policies, name):
    with pytest.raises(ValueError, match="roll it out"):
        load_prior(policies[name]).sample(2)
