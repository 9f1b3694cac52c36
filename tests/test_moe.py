"""Behaviour of the MoE layer and its routers (tiny CPU sizes)."""

from __future__ import annotations

import math

import pytest
import torch

from layers.instantiate import ConfigError, instantiate
from layers.moe import (
    ConvMoE,
    ExpertChoiceRouter,
    MoE,
    MoEPlusPlusRouter,
    SoftMoERouter,
    TopKRouter,
    balance_loss,
    link_gating_residuals,
)

D, E = 16, 4
SPARSE = ["TopKRouter", "AuxFreeRouter", "ExpertChoiceRouter", "ReLURouter", "TopAnyRouter", "MoEPlusPlusRouter",
          "SparseMixerRouter", "StableMoERouter"]
ALL = SPARSE + ["SoftMoERouter"]


def make(router: str = "TopKRouter", top_k: int = 2, **kw) -> MoE:
    params = kw.pop("router_params", {})
    return MoE(D, E, top_k, 32, router={"target": f"layers.moe.{router}", "params": params}, **kw)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def reference(moe: MoE, x: torch.Tensor) -> torch.Tensor:
    """Per-token loop over the router's assignments with plain autograd ops."""
    r = moe.route(x)
    xf = x.reshape(-1, D)
    out = [torch.zeros(D, dtype=x.dtype) for _ in range(xf.shape[0])]
    for t, e, g in zip(r.token_idx.tolist(), r.expert_idx.tolist(), r.gate):
        out[t] = out[t] + g * moe.experts.expert(e, xf[t : t + 1])[0]
    y = torch.stack(out)
    if r.extra is not None:
        y = y + r.extra
    if moe.shared is not None:
        y = y + moe.shared(xf)
    return y.reshape(x.shape)


def test_topk_gates_renormalised_or_raw_softmax():
    x = torch.randn(2, 5, D)
    r2 = TopKRouter(D, E, top_k=2)(x)
    assert torch.allclose(r2.gate.view(-1, 2).sum(-1), torch.ones(10), atol=1e-6)
    raw = TopKRouter(D, E, top_k=2, renormalize=False)
    raw.proj.weight.data.copy_(TopKRouter(D, E).proj.weight)
    probs = raw.logits(x).softmax(-1)
    r = raw(x)
    assert torch.allclose(r.gate.view(-1, 2), probs.topk(2, -1).values, atol=1e-6)
    assert (r.gate.view(-1, 2).sum(-1) < 1).all()
    top1 = TopKRouter(D, E, top_k=1)(x)  # Switch keeps the raw probability (< 1) so the router learns
    assert top1.gate.numel() == 10 and (top1.gate < 1).all() and (top1.gate > 1 / E).all()


def _expert_choice_direct(moe: MoE, x: torch.Tensor, group_size: int) -> torch.Tensor:
    """Zhou et al. 2022 written out: S = softmax(X W) over experts per group of tokens; expert e
    takes the c = ceil(n * cf / E) tokens of the group with the largest S[:, e]; y_t = sum over
    the experts that took t of S[t, e] * FFN_e(x_t)."""
    xf = x.reshape(-1, D)
    s = (xf.float() @ moe.router.proj.weight.float().t()).softmax(-1).to(x.dtype)  # router runs in fp32
    c = math.ceil(group_size * moe.router.capacity_factor / E)
    rows = []
    for t in range(xf.shape[0]):
        g0 = t // group_size * group_size
        y = torch.zeros(D, dtype=x.dtype)
        for e in range(E):
            group_scores = s[g0:g0 + group_size, e]
            if t - g0 in group_scores.topk(c).indices.tolist():
                y = y + s[t, e] * moe.experts.expert(e, xf[t:t + 1])[0]
        rows.append(y)
    return torch.stack(rows).reshape(x.shape)


@pytest.mark.parametrize("group", ["batch", "sequence"])
def test_expert_choice_matches_the_paper_formula_with_gradients(group):
    """Default = the paper's batch-level choice: capacity tokens x cf / experts over all B*T tokens.
    (The old router chose per sequence only; with B > 1 its selection and output differ.)"""
    params = {"capacity_factor": 1.5} if group == "batch" else {"capacity_factor": 1.5, "group": "sequence"}
    moe = make("ExpertChoiceRouter", router_params=params).double()
    assert moe.router.group == group and not moe.causal_safe
    x = torch.randn(3, 6, D, dtype=torch.double, requires_grad=True)
    n = 18 if group == "batch" else 6
    r = moe.router(x)
    c = math.ceil(n * 1.5 / E)
    assert r.stats["capacity"].item() == c
    assert torch.bincount(r.expert_idx, minlength=E).tolist() == [18 // n * c] * E  # balanced by construction
    got = moe(x)[0]
    want = _expert_choice_direct(moe, x, n)
    assert torch.allclose(got, want, atol=1e-10)
    params_ = [x, moe.router.proj.weight, *moe.experts.parameters()]
    g_got = torch.autograd.grad(got.square().sum(), params_)
    g_want = torch.autograd.grad(want.square().sum(), params_)
    for a, b in zip(g_got, g_want):
        assert torch.allclose(a, b, atol=1e-10)


def test_expert_choice_batch_level_differs_from_per_sequence():
    """A skewed batch: sequence 0's tokens are all more affine to expert 0 than sequence 1's, so
    at batch level expert 0 takes only sequence-0 tokens; per sequence it must take some of both."""
    router = ExpertChoiceRouter(D, E, capacity_factor=1.0)
    x = torch.randn(2, 8, D)
    x[0] += 3 * router.proj.weight[0] / router.proj.weight[0].norm()
    r = router(x)
    took = r.token_idx[r.expert_idx == 0]
    assert (took < 8).all() and took.numel() == math.ceil(16 / E)
    router.group = "sequence"
    r = router(x)
    took = r.token_idx[r.expert_idx == 0]
    assert (took < 8).sum() == (took >= 8).sum() == math.ceil(8 / E)


def test_soft_moe_dispatch_and_combine_are_convex():
    router = SoftMoERouter(D, E, slots_per_expert=3)
    dispatch, combine = router.weights(torch.randn(2, 7, D))
    assert torch.allclose(dispatch.sum(1), torch.ones(2, E * 3), atol=1e-6)  # over tokens
    assert torch.allclose(combine.sum(-1), torch.ones(2, 7), atol=1e-6)  # over slots
    assert not router.causal_safe


def test_balance_loss_is_one_at_uniform_and_larger_when_skewed():
    uniform = torch.full((E,), 1 / E)
    assert balance_loss(uniform, uniform).item() == pytest.approx(1.0)
    skew_load, skew_p = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.55, 0.15, 0.15, 0.15])
    assert balance_loss(skew_load, skew_p).item() > 1.3
    # Through the router: its reported, weighted loss is weight * balance (+ z-loss, here off).
    router = TopKRouter(D, E, top_k=1, balance_weight=0.5, z_loss_weight=0.0)
    router.proj.weight.data.zero_()
    router.proj.weight.data[0] = 1.0
    x = torch.rand(4, 8, D) + 0.5  # every token prefers expert 0
    r = router(x)
    assert r.load[0].item() == 1.0
    assert r.loss.item() == pytest.approx(0.5 * r.stats["balance_loss"].item())
    assert r.stats["balance_loss"].item() > 2.0


def test_aux_free_bias_moves_load_toward_uniform():
    moe = make("AuxFreeRouter", top_k=1, router_params={"bias_update_rate": 0.01})
    w = moe.router.proj.weight.data
    w.normal_(0, 0.1)
    w[0] += 0.5  # skew: expert 0 wins for every token
    x = torch.rand(4, 16, D)
    moe.train()
    loads = torch.stack([moe.router(x).load for _ in range(60)])  # the router alone: fast
    # Sign updates make the load oscillate around balance; its recent average is near uniform.
    late = loads[-20:].mean(0)
    assert loads[0].max() == 1.0
    assert late.max() < 0.4 and late.min() > 0.1
    assert late.std() < 0.2 * loads[0].std()
    assert moe.router.bias[0] < 0 < moe.router.bias[1:].max()
    moe.eval()  # no update outside training
    before = moe.router.bias.clone()
    moe(x)
    assert torch.equal(before, moe.router.bias)


@pytest.mark.parametrize("router", ALL)
def test_gradients_reach_router_and_experts(router):
    moe = make(router)
    if router == "ReLURouter":
        moe.router.l1_coeff.fill_(1e-2)
    x = torch.randn(2, 6, D, requires_grad=True)
    y, aux = moe(x)
    (y.square().mean() + aux["loss"]).backward()
    skip = {"router.residual_proj"}  # used only when layers are linked (tested below)
    for name, p in moe.named_parameters():
        if name not in skip:
            assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert x.grad.abs().sum() > 0


@pytest.mark.parametrize("router", SPARSE)
@pytest.mark.parametrize("max_padding", [10.0, None])
def test_dropless_dispatch_matches_per_token_reference(router, max_padding):
    moe = make(router, max_padding=max_padding, num_shared=1 if router == "TopKRouter" else 0).eval()
    x = torch.randn(3, 5, D)
    y, aux = moe(x)
    assert aux["dropped_fraction"].item() == 0.0
    assert torch.allclose(y, reference(moe, x), atol=1e-5)


@pytest.mark.parametrize("activation", ["swiglu", "gelu"])
def test_both_expert_paths_match_reference_gradients(activation):
    for max_padding in (10.0, None):
        torch.manual_seed(1)
        moe = make(activation=activation, max_padding=max_padding).double()
        x = torch.randn(2, 7, D, dtype=torch.double, requires_grad=True)
        params = [x, *moe.parameters()]
        got = torch.autograd.grad(moe(x)[0].square().sum(), params)
        want = torch.autograd.grad(reference(moe, x).square().sum(), params)
        for g, w in zip(got, want):
            assert torch.allclose(g, w, atol=1e-10)


@pytest.mark.parametrize("policy", ["position", "gate"])
def test_capacity_drops_exactly_the_overflow(policy):
    moe = make(top_k=1, capacity_factor=1.0, drop_policy=policy).eval()
    moe.router.proj.weight.data.zero_()
    moe.router.proj.weight.data[0] = 1.0
    x = torch.rand(1, 16, D) + 0.1  # all 16 tokens choose expert 0
    y, aux = moe(x)
    capacity = math.ceil(1 * 1.0 * 16 / E)
    assert aux["dropped_fraction"].item() == pytest.approx((16 - capacity) / 16)
    kept = (y[0].abs().sum(-1) > 0).nonzero().flatten()
    if policy == "position":
        assert kept.tolist() == list(range(capacity))
    else:
        gates = moe.router(x).gate
        assert set(kept.tolist()) == set(gates.topk(capacity).indices.tolist())
    # General count: dropped = sum over experts of max(0, count - capacity).
    moe2 = make(top_k=2, capacity_factor=0.75).eval()
    x2 = torch.randn(2, 9, D)
    counts = torch.bincount(moe2.router(x2).expert_idx, minlength=E)
    cap2 = math.ceil(2 * 0.75 * 18 / E)
    expected = (counts - cap2).clamp(min=0).sum().item() / 36
    assert moe2(x2)[1]["dropped_fraction"].item() == pytest.approx(expected)


@pytest.mark.parametrize("router", ["ExpertChoiceRouter", "SoftMoERouter"])
def test_causal_transformer_refuses_non_causal_routers(router):
    transformer = pytest.importorskip("layers.transformer")
    spec = {"target": "layers.moe.MoE", "params": {"num_experts": E, "hidden_dim": 32,
                                                   "router": {"target": f"layers.moe.{router}"}}}
    with pytest.raises(ValueError, match=router):
        transformer.Transformer(D, 2, 2, causal=True, ffn=spec, max_len=8)
    model = transformer.Transformer(D, 2, 2, causal=False, ffn=spec, max_len=8)
    h, aux = model(torch.randn(2, 8, D))
    assert h.shape == (2, 8, D) and "layer0/load" in aux


def test_causal_transformer_with_topk_moe_sums_aux_losses():
    transformer = pytest.importorskip("layers.transformer")
    spec = {"target": "layers.moe.MoE", "params": {"num_experts": E, "hidden_dim": 32}}
    model = transformer.Transformer(D, 2, 2, causal=True, ffn=spec, max_len=8)
    seen = []
    for m in model.modules():
        if isinstance(m, MoE):
            m.register_forward_hook(lambda mod, args, out: seen.append(out[1]["loss"]))
    h, aux = model(torch.randn(2, 8, D))
    assert len(seen) == 2 and aux["aux_loss"].item() == pytest.approx(sum(seen).item(), rel=1e-5)
    assert aux["aux_loss"].item() > 0 and "layer1/load" in aux


def test_remoe_l1_coefficient_moves_toward_target_sparsity():
    moe = make("ReLURouter", top_k=1, router_params={"l1_init": 1e-3, "l1_update": 1.2}).train()
    router = moe.router
    x = torch.randn(4, 8, D)
    assert router.target_sparsity == pytest.approx(0.75)
    moe(x)  # about half the gates are open at init: too dense -> coefficient rises
    assert router.l1_coeff.item() == pytest.approx(1.2e-3)
    router.proj.weight.data.neg_().abs_()
    saved = router.proj.weight.data.clone()
    router.proj.weight.data.copy_(-saved)
    moe(x.abs())  # all gates closed: too sparse -> coefficient falls
    assert router.l1_coeff.item() == pytest.approx(1e-3)
    # Optimising with the penalty drives sparsity from ~0.5 toward the target 0.75.
    torch.manual_seed(0)
    moe = make("ReLURouter", top_k=1, router_params={"l1_init": 0.05, "l1_update": 1.2}).train()
    opt = torch.optim.SGD(moe.router.parameters(), lr=0.5)
    start = moe.router(x).stats["sparsity"].item()
    for _ in range(40):  # the router alone: its penalty is the only loss here
        r = moe.router(x)
        opt.zero_grad()
        r.loss.backward()
        opt.step()
    end = moe.router(x).stats["sparsity"].item()
    assert start < 0.6 and abs(end - 0.75) < abs(start - 0.75) - 0.1


@pytest.mark.parametrize("kind", ["zero", "copy", "constant"])
def test_zero_computation_experts_behave_as_named(kind):
    moe = make("MoEPlusPlusRouter", top_k=1, router_params={"num_zero": 1, "num_copy": 1, "num_constant": 1}).eval()
    choice = E + ["zero", "copy", "constant"].index(kind)
    w = moe.router.proj.weight.data
    w.zero_()
    w[choice] = 1.0
    x = torch.rand(2, 5, D) + 0.5  # the chosen zero-computation expert wins for every token
    y, aux = moe(x)
    assert aux["ffn_fraction"].item() == 0.0 and aux["load"][choice].item() == 1.0
    xf = x.reshape(-1, D)
    gate = torch.nn.functional.linear(xf, w).softmax(-1)[:, choice : choice + 1]
    if kind == "zero":
        want = torch.zeros_like(xf)
    elif kind == "copy":
        want = gate * xf
    else:
        alpha = moe.router.const_mix(xf).softmax(-1)
        want = gate * (alpha[:, :1] * xf + alpha[:, 1:] * moe.router.const_vectors[0])
    assert torch.allclose(y.reshape(-1, D), want, atol=1e-6)


def test_gating_residuals_link_consecutive_layers():
    layers = torch.nn.ModuleList([make("MoEPlusPlusRouter") for _ in range(3)])
    assert link_gating_residuals(layers) == 2
    x = torch.randn(2, 4, D)
    h = x
    loss = 0
    for layer in layers:
        y, aux = layer(h)
        h = h + y
        loss = loss + aux["loss"]
    (h.square().mean() + loss).backward()
    grads = [layer.router.residual_proj.grad for layer in layers]
    assert grads[0] is None  # the first layer has no predecessor
    assert all(g is not None and g.abs().sum() > 0 for g in grads[1:])
    assert isinstance(layers[1].router, MoEPlusPlusRouter)


@pytest.mark.parametrize("router", ALL)
def test_single_token_decoding_works(router):
    moe = make(router).eval()
    for shape in [(1, 1, D), (3, 1, D)]:
        y, aux = moe(torch.randn(*shape))
        assert y.shape == shape and torch.isfinite(y).all()
        assert aux["load"].sum().item() == pytest.approx(1.0) or aux["load"].sum().item() == 0.0


def test_conv_moe_applies_moe_over_positions():
    conv = ConvMoE(D, num_experts=E, top_k=2, hidden_dim=32).eval()
    x = torch.randn(2, D, 3, 5)
    y, aux = conv(x)
    tokens = x.flatten(2).transpose(1, 2)
    want = conv.moe(tokens)[0].transpose(1, 2).reshape(x.shape)
    assert y.shape == x.shape and torch.allclose(y, want) and "load" in aux
    assert ConvMoE(D, num_experts=E, hidden_dim=32)(torch.randn(1, D, 7))[0].shape == (1, D, 7)


def test_shared_experts_are_always_added():
    moe = make(num_shared=2).eval()
    x = torch.randn(2, 3, D)
    y = moe(x)[0]
    shared = moe.shared(x.reshape(-1, D)).reshape(x.shape)
    moe.shared = None
    assert torch.allclose(y - moe(x)[0], shared, atol=1e-6)


def test_built_from_a_config_spec_and_bad_params_fail():
    spec = {"target": "layers.moe.MoE", "params": {"num_experts": 8, "top_k": 2, "hidden_dim": 24,
            "router": {"target": "layers.moe.TopKRouter", "params": {"balance_weight": 0.02}}}}
    moe = instantiate(spec, dim=D)
    assert moe.router.balance_weight == 0.02 and moe.router.num_experts == 8
    spec["params"]["router"]["params"] = {"balanse_weight": 0.02}
    with pytest.raises(ConfigError, match="balance_weight"):
        instantiate(spec, dim=D)


@pytest.mark.slow
def test_smoke_ar_moe_config_trains_logs_load_and_samples(tmp_path):
    import csv

    from data.codes import CodeWriter
    from stage2.prior import load_prior
    from tokenforge.train import main

    spec = {"grid": [3, 3], "depth": None, "codebook_size": 12, "continuous_dim": None}
    writer = CodeWriter(tmp_path / "codes", spec, tokenizer_path="none.ckpt", tokenizer_sha256="0" * 64,
                        shard_size=64)
    for split, n in (("train", 64), ("val", 16)):
        labels = torch.arange(n) % 3
        codes = ((torch.arange(9)[None] * (labels[:, None] + 1)) % 12).view(n, 3, 3)
        writer.write_shard(split, 0, codes, labels)
    writer.finalize()
    main(["configs/smoke/ar_moe.yaml", f"data.params.codes={tmp_path / 'codes'}", "trainer.max_steps=20",
          "--runs", str(tmp_path / "runs")])
    run = tmp_path / "runs" / "ar_moe"
    rows = list(csv.DictReader(open(run / "logs" / "csv" / "metrics.csv")))
    train = [float(r["train/loss"]) for r in rows if r.get("train/loss")]
    assert train[-1] < train[0] - 0.3, train
    assert any(k.startswith("train/layer0/") for k in rows[0]), sorted(rows[0])
    model = load_prior(run / "checkpoints" / "last.ckpt")
    assert isinstance(model.transformer.blocks[0].ffn, MoE)
    assert model.sample(2, cond=1).shape == (2, 3, 3)  # cached decoding feeds the MoE (B, 1, D)
