"""Expert merging (layers/moe/merge.py, MC-SMoE's merge step): identical experts merge to no change,
alignment undoes a permutation of hidden units, grouping and weights follow the paper's formulas."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from layers.moe import MoE, group_experts, merge_groups

D, E = 8, 4


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def make(router: str = "TopKRouter", top_k: int = 2, activation: str = "swiglu") -> MoE:
    return MoE(D, E, top_k, 6, router={"target": f"layers.moe.{router}", "params": {}},
               activation=activation).double().eval()


@pytest.mark.parametrize("router", ["TopKRouter", "ExpertChoiceRouter", "SparseMixerRouter"])
@pytest.mark.parametrize("max_padding", [10.0, None])
def test_merging_two_identical_experts_changes_nothing(router, max_padding):
    moe = make(router)
    moe.max_padding = max_padding
    moe.experts.w_in.data[1] = moe.experts.w_in.data[0]
    moe.experts.w_out.data[1] = moe.experts.w_out.data[0]
    x = torch.randn(3, 7, D, dtype=torch.double)
    before = moe(x)[0]
    merge_groups(moe, torch.tensor([0, 0, 1, 2]), usage=torch.tensor([0.4, 0.1, 0.3, 0.2]))
    assert moe.experts.num_experts == 3 and moe.expert_map.tolist() == [0, 0, 1, 2]
    assert torch.allclose(moe(x)[0], before, atol=1e-12)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_alignment_undoes_a_permutation_of_hidden_units(activation):
    moe = make(activation=activation)
    perm = torch.randperm(6)
    w_in, w_out = moe.experts.w_in.data, moe.experts.w_out.data
    if activation == "swiglu":
        w_in[2] = torch.cat([w_in[0][:, :6][:, perm], w_in[0][:, 6:][:, perm]], dim=1)
    else:
        w_in[2] = w_in[0][:, perm]
    w_out[2] = w_out[0][perm]  # expert 2 computes exactly expert 0's function
    x = torch.randn(2, 9, D, dtype=torch.double)
    before = moe(x)[0]
    want_in, want_out = w_in[0].clone(), w_out[0].clone()
    merge_groups(moe, torch.tensor([0, 1, 0, 2]), usage=torch.tensor([0.5, 0.2, 0.2, 0.1]))
    assert torch.allclose(moe.experts.w_in[0], want_in) and torch.allclose(moe.experts.w_out[0], want_out)
    assert torch.allclose(moe(x)[0], before, atol=1e-12)


def test_grouping_and_usage_weighted_average_follow_the_formula():
    moe = make(top_k=1)
    x = torch.randn(4, 16, D, dtype=torch.double)
    labels, usage = group_experts(moe, x, num_groups=2)
    # Direct: usage from top-1 choices; similarity (cos + 1)/2 of router-logit columns.
    logits = x.reshape(-1, D).float() @ moe.router.proj.weight.float().t()
    want_usage = torch.bincount(logits.argmax(-1), minlength=E).float() / 64
    assert torch.allclose(usage, want_usage)
    dominant = torch.argsort(want_usage, descending=True, stable=True)[:2].tolist()
    for i in range(E):
        if i in dominant:
            assert labels[i] == dominant.index(i)
        else:
            sims = [(F.cosine_similarity(logits[:, i], logits[:, j], dim=0) + 1) / 2 for j in dominant]
            assert labels[i] == labels[dominant[int(torch.stack(sims).argmax())]]
    old_in = moe.experts.w_in.detach().clone()
    merge_groups(moe, labels, usage, align=False)
    for g in range(2):
        members = (labels == g).nonzero().flatten()
        f = usage[members].double()
        want = (f[:, None, None] * old_in[members]).sum(0) / f.sum()
        assert torch.allclose(moe.experts.w_in[g], want)
    assert moe(x)[0].shape == x.shape
    with pytest.raises(ValueError, match="already merged"):
        merge_groups(moe, labels)
