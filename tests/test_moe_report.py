"""What experts learn (issue 21): the routing recorder's tallies against a router whose decisions are
known by construction, the load history training keeps in the checkpoint, and evaluate's MoE report."""

from __future__ import annotations

import math

import pytest
import torch

from helpers import CONFIGS, train
from layers.moe import MoE, RoutingRecorder, mutual_information_bits
from tokenforge.evaluate import main as evaluate
from tokenforge.moe_report import load_history


def _class_router_moe() -> MoE:
    """Top-1 MoE over 2 experts whose router logits are the input's first two channels."""
    torch.manual_seed(0)
    moe = MoE(4, num_experts=2, top_k=1, hidden_dim=8,
              router={"target": "layers.moe.TopKRouter", "params": {"balance_weight": 0.0}})
    with torch.no_grad():
        moe.router.proj.weight.zero_()
        moe.router.proj.weight[0, 0] = moe.router.proj.weight[1, 1] = 10.0
    return moe


def test_recorder_tallies_load_class_position_and_value_of_known_routing():
    moe = _class_router_moe()
    labels = torch.tensor([0, 1, 1])
    x = torch.zeros(3, 5, 4)
    x[labels == 0, :, 0] = 1.0  # class 0 -> expert 0, class 1 -> expert 1, every position
    x[labels == 1, :, 1] = 1.0
    values = torch.tensor([[7, 7, 7, 7], [2, 2, 2, 2], [2, 2, 2, 2]])  # 4 values right-aligned on 5 positions
    with RoutingRecorder(moe) as rec:
        moe(x)
        rec.commit(labels=labels, values=values)
    tally = rec.tallies[""]
    assert tally.load.tolist() == [5, 10] and tally.forwards == 1
    assert tally.by_class.tolist() == [[5, 0], [0, 10]]
    assert tally.position.tolist() == [[1, 2]] * 5
    assert tally.by_value[7].tolist() == [4, 0] and tally.by_value[2].tolist() == [0, 8]  # position 0 has no value
    assert tally.by_value.sum() == 12
    # routing determined by the class: I(class; expert) = H(expert) = H(1/3, 2/3) bits
    h = -(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3)
    assert mutual_information_bits(tally.by_class) == pytest.approx(h)
    assert mutual_information_bits(torch.tensor([[3, 3], [5, 5]])) == pytest.approx(0.0, abs=1e-12)


def test_recorder_leaves_the_model_as_it_was_and_discards_uncommitted_forwards():
    moe = _class_router_moe()
    x = torch.randn(2, 3, 4)
    before = moe(x)[0]
    with RoutingRecorder(moe) as rec:
        torch.testing.assert_close(moe(x)[0], before)  # recording changes no output
        rec.discard()
        moe(x)
        rec.commit()
    assert "route" not in moe.__dict__ and not moe._forward_hooks
    assert rec.tallies[""].forwards == 1 and rec.tallies[""].load.sum() == 6


def test_prior_with_moe_keeps_a_load_history_and_evaluate_reports_what_experts_learned(tokenizer_and_codes, tmp_path):
    _, codes = tokenizer_and_codes
    train(CONFIGS / "smoke" / "ar_moe.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=3",
                                                         "trainer.val_check_interval=3"], name="armoe")
    ckpt = tmp_path / "armoe" / "checkpoints" / "last.ckpt"
    history = load_history(torch.load(ckpt, weights_only=True))
    assert history is not None and history["steps"] == [1]
    layer, series = next(iter(history["layers"].items()))
    assert len(series["load"][0]) >= 2 and sum(series["load"][0]) == pytest.approx(1.0, abs=1e-4)
    out = tmp_path / "ev"
    res = evaluate([str(ckpt), "--fid", "none", "--num-samples", "12", "--limit", "16", "--out", str(out)])
    mi = [v for k, v in res.items() if k.endswith("/class_mi_bits")]
    assert mi and all(v >= 0 for v in mi)
    assert any(k.endswith("/value_mi_bits") for k in res)
    assert all(v >= 1.0 for k, v in res.items() if k.endswith("/load_max_over_mean"))
    for name in ("moe_load_history.png", "moe_expert_by_class.png", "moe_expert_by_value.png",
                 "moe_expert_by_position.png"):
        assert (out / name).is_file(), name
        assert name in (out / "report.md").read_text()


def test_tokenizer_with_conv_moe_reports_routing_by_class_and_spatial_position(tmp_path):
    train(CONFIGS / "smoke" / "vqvae_moe.yaml", tmp_path, ["trainer.max_steps=2"], name="vqmoe")
    ckpt = tmp_path / "vqmoe" / "checkpoints" / "last.ckpt"
    out = tmp_path / "ev"
    res = evaluate([str(ckpt), "--fid", "none", "--lpips", "none", "--limit", "16", "--out", str(out)])
    assert any(k.startswith("moe/") and k.endswith("/class_mi_bits") for k in res)
    assert (out / "moe_expert_by_position.png").is_file() and (out / "moe_expert_by_class.png").is_file()
