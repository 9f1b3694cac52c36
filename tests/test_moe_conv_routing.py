"""MoE in a CNN (issue 21's tokenizer workload): ``layers.moe.ConvMoE`` on a feature map against each
router's paper formula written out over spatial positions, with gradients, and the decoder slot that
hosts it (``stage1.conv_encoder_decoder.TokenwiseSlot``)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from layers.moe import ConvMoE
from stage1.conv_encoder_decoder import Decoder, collect_aux

C, E, HID = 8, 4, 6
B, H, W = 2, 3, 5  # T = 15 positions per image, N = 30 in the batch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def conv_moe(router: str, top_k: int = 2, **params) -> ConvMoE:
    return ConvMoE(C, num_experts=E, top_k=top_k, hidden_dim=HID,
                   router={"target": f"layers.moe.{router}", "params": params}).double()


def positions(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C): image-major, row-major positions."""
    return x.flatten(2).transpose(1, 2).reshape(-1, x.shape[1])


def to_map(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    b, c = like.shape[:2]
    return y.view(b, -1, c).transpose(1, 2).reshape(like.shape)


def router_probs(conv: ConvMoE, xf: torch.Tensor) -> torch.Tensor:
    """softmax(X W_g) over experts; routers compute their logits in float32 (ST-MoE), so does this."""
    return (xf.float() @ conv.moe.router.proj.weight.float().t()).softmax(-1).to(xf.dtype)


def expert_choice_direct(conv: ConvMoE, x: torch.Tensor, cf: float) -> torch.Tensor:
    """Zhou et al. 2022 over the batch's positions: expert e takes the c = ceil(N cf / E) positions with
    the largest S[:, e] among all N = B*H*W positions; y_t = sum over the experts that took t of
    S[t, e] FFN_e(x_t)."""
    xf = positions(x)
    s = router_probs(conv, xf)
    c = math.ceil(xf.shape[0] * cf / E)
    y = torch.zeros_like(xf)
    for e in range(E):
        top = s[:, e].topk(c).indices
        y = y.index_add(0, top, s[top, e:e + 1] * conv.moe.experts.expert(e, xf[top]))
    return to_map(y, x)


def token_choice_direct(conv: ConvMoE, x: torch.Tensor) -> torch.Tensor:
    """GShard top-2: y_t = sum over the 2 largest p_te of p_te / (p_t1 + p_t2) FFN_e(x_t)."""
    xf = positions(x)
    g, idx = router_probs(conv, xf).topk(2, -1)
    g = g / g.sum(-1, keepdim=True)
    y = torch.stack([sum(g[t, j] * conv.moe.experts.expert(int(idx[t, j]), xf[t:t + 1])[0] for j in range(2))
                     for t in range(len(xf))])
    return to_map(y, x)


def soft_direct(conv: ConvMoE, x: torch.Tensor, slots: int) -> torch.Tensor:
    """Puigcerver et al. 2023 per image: logits = norm(X) (scale norm(Phi)), D = softmax over the
    image's positions, C = softmax over slots, slot inputs D^T X, y = C [FFN_e(slots of e)]_e."""
    r, out = conv.moe.router, []
    for image in x:
        xt = image.flatten(1).t()  # (T, C)
        logits = F.normalize(xt.float(), dim=-1) @ (r.scale * F.normalize(r.phi.float(), dim=0))
        dispatch, combine = logits.softmax(0).to(xt.dtype), logits.softmax(1).to(xt.dtype)
        s_in = dispatch.t() @ xt
        s_out = torch.cat([conv.moe.experts.expert(e, s_in[e * slots:(e + 1) * slots]) for e in range(E)])
        out.append((combine @ s_out).t().reshape(image.shape))
    return torch.stack(out)


CASES = {
    "expert_choice": (lambda: conv_moe("ExpertChoiceRouter", capacity_factor=2.0),
                      lambda conv, x: expert_choice_direct(conv, x, 2.0)),
    "token_choice": (lambda: conv_moe("TopKRouter", balance_weight=0.0, z_loss_weight=0.0), token_choice_direct),
    "soft": (lambda: conv_moe("SoftMoERouter", slots_per_expert=3), lambda conv, x: soft_direct(conv, x, 3)),
}


@pytest.mark.parametrize("case", list(CASES))
def test_conv_moe_matches_the_router_formula_over_positions_with_gradients(case):
    make, direct = CASES[case]
    conv = make()
    x = torch.randn(B, C, H, W, dtype=torch.double, requires_grad=True)
    got, want = conv(x)[0], direct(conv, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)  # router logits in float32
    params = [x, *[p for p in conv.parameters()]]
    g_got = torch.autograd.grad(got.square().sum(), params)
    g_want = torch.autograd.grad(want.square().sum(), params)
    for a, b in zip(g_got, g_want):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    assert all(g.abs().sum() > 0 for g in g_got)  # router, experts and input all receive gradient


def test_expert_choice_capacity_counts_every_position_of_the_batch():
    """c = ceil(B*H*W * cf / E) assignments per expert, so ~cf experts per position on average."""
    conv = conv_moe("ExpertChoiceRouter", capacity_factor=2.0)
    x = torch.randn(B, C, H, W, dtype=torch.double)
    r = conv.moe.router(x.flatten(2).transpose(1, 2))
    c = math.ceil(B * H * W * 2.0 / E)
    assert r.stats["capacity"].item() == c
    assert torch.bincount(r.expert_idx, minlength=E).tolist() == [c] * E
    assert r.token_idx.numel() / (B * H * W) == pytest.approx(2.0, abs=E / (B * H * W))


def test_soft_moe_mixes_only_the_positions_of_one_image():
    conv = conv_moe("SoftMoERouter", slots_per_expert=3)
    x = torch.randn(B, C, H, W, dtype=torch.double)
    y = conv(x)[0]
    x2 = x.clone()
    x2[1] += torch.randn_like(x2[1])
    y2 = conv(x2)[0]
    torch.testing.assert_close(y2[0], y[0])
    assert not torch.allclose(y2[1], y[1])


def test_one_expert_conv_moe_is_a_dense_swiglu_ffn():
    """The study's dense baselines: one expert, softmax gate = 1 exactly."""
    conv = ConvMoE(C, num_experts=1, top_k=1, hidden_dim=HID,
                   router={"target": "layers.moe.TopKRouter", "params": {"balance_weight": 0.0, "z_loss_weight": 0.0}})
    x = torch.randn(B, C, H, W)
    w_in, w_out = conv.moe.experts.w_in[0], conv.moe.experts.w_out[0]
    gate, up = (positions(x) @ w_in).chunk(2, dim=-1)
    want = to_map((F.silu(gate) * up) @ w_out, x)
    torch.testing.assert_close(conv(x)[0], want)


@pytest.mark.parametrize("router", ["ExpertChoiceRouter", "TopKRouter", "SoftMoERouter"])
def test_decoder_mid_slot_trains_every_router_and_reports_its_aux(router):
    slot = {"target": "layers.moe.ConvMoE", "params": {"num_experts": E, "top_k": 2, "hidden_dim": HID,
                                                       "router": {"target": f"layers.moe.{router}"}}}
    dec = Decoder(out_channels=1, z_channels=4, channels=4, ch_mult=(1, 2), num_res_blocks=0, mid_attn=False,
                  groups=4, mid_ffn=slot)
    z = torch.randn(2, 4, 3, 3)
    out = dec(z)
    aux = collect_aux(dec)
    assert out.shape == (2, 1, 6, 6)
    assert "aux_loss" in aux and "mid.1/load" in aux
    (out.square().mean() + aux["aux_loss"]).backward()
    inner = dec.mid[1].inner.moe
    assert inner.experts.w_in.grad.abs().sum() > 0
    router_grad = inner.router.phi.grad if router == "SoftMoERouter" else inner.router.proj.weight.grad
    assert router_grad is not None and router_grad.abs().sum() > 0
