"""The transformer backbone: causality, KV-cache equivalence, rotary geometry, the FFN slot."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

import layers.mlp
from layers.positions import Rotary
from layers.transformer import Transformer


def _model(positions: str, causal: bool = True, **kw) -> Transformer:
    grid = [3, 4] if positions == "rope2d" else None
    max_len = None if positions == "rope2d" else 12
    return Transformer(32, 2, 4, causal, positions=positions, max_len=max_len, grid=grid, **kw).eval()


@pytest.mark.parametrize("positions", ["rope1d", "learned", "rope2d", "none"])
def test_changing_a_later_token_never_changes_earlier_outputs(positions):
    model = _model(positions)
    x = torch.randn(2, 12, 32)
    j = 7
    y = x.clone()
    y[:, j] += torch.randn(2, 32)
    with torch.no_grad():
        hx, _ = model(x)
        hy, _ = model(y)
    torch.testing.assert_close(hx[:, :j], hy[:, :j], rtol=0, atol=0)
    assert (hx[:, j:] - hy[:, j:]).abs().amax(dim=-1).min() > 1e-4  # every later position sees it


def test_bidirectional_attention_sees_the_future():
    model = _model("rope1d", causal=False)
    x = torch.randn(1, 12, 32)
    y = x.clone()
    y[:, -1] += 1.0
    with torch.no_grad():
        assert not torch.allclose(model(x)[0][:, 0], model(y)[0][:, 0])


@pytest.mark.parametrize("positions", ["rope1d", "learned", "rope2d"])
@pytest.mark.parametrize("norm,mlp", [("rmsnorm", "swiglu"), ("layernorm", "gelu")])
def test_kv_cache_decoding_matches_full_recomputation(positions, norm, mlp):
    torch.manual_seed(1)
    model = _model(positions, mlp=mlp, norm=norm)
    x = torch.randn(3, 12, 32)
    with torch.no_grad():
        cache = model.new_cache(3)
        chunks = [model(x[:, :4], cache)[0]]  # a multi-token prefill, then token by token
        for t in range(4, 12):
            chunks.append(model(x[:, t : t + 1], cache)[0])
        assert cache.length == 12
        torch.testing.assert_close(torch.cat(chunks, 1), model(x)[0], rtol=0, atol=1e-5)
        with pytest.raises(ValueError, match="max_len|full"):
            model(x[:, :1], cache)


def test_rope2d_rotates_half_by_row_and_half_by_column():
    rot = Rotary(8, grid=[3, 4])  # 4 pairs: 2 for rows, 2 for columns
    q = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    k = torch.randn(1, 1, 1, 8).expand(1, 1, 12, 8)
    qr, kr = rot(q, k)
    scores = (qr[0, 0] @ kr[0, 0].T)  # (12, 12)
    cell = [(i // 4, i % 4) for i in range(12)]
    # scores depend on (row offset, column offset) only: relative in both axes
    by_offset: dict[tuple[int, int], Tensor] = {}
    for i in range(12):
        for j in range(12):
            key = (cell[j][0] - cell[i][0], cell[j][1] - cell[i][1])
            if key in by_offset:
                torch.testing.assert_close(scores[i, j], by_offset[key], atol=1e-5, rtol=0)
            by_offset[key] = scores[i, j]
    # channel pairs 0,1 (and 4,5) follow the row only; pairs 2,3 (and 6,7) the column only
    assert torch.equal(rot.cos[0, :2], rot.cos[3, :2]) and not torch.equal(rot.cos[0, 2:], rot.cos[3, 2:])
    assert torch.equal(rot.cos[0, 2:], rot.cos[4, 2:]) and not torch.equal(rot.cos[0, :2], rot.cos[4, :2])


class AuxFFN(nn.Module):
    """A per-token FFN that reports an auxiliary loss and a statistic, like an MoE layer."""

    def __init__(self, dim: int, weight: float = 0.5):
        super().__init__()
        self.lin = nn.Linear(dim, dim)
        self.weight = weight

    def forward(self, x: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        y = self.lin(x)
        return y, {"loss": self.weight * y.pow(2).mean(), "load": torch.ones(4) / 4}


class LeakyRouter(nn.Module):
    pass


class SequenceMixingFFN(AuxFFN):
    causal_safe = False

    def __init__(self, dim: int):
        super().__init__(dim)
        self.router = LeakyRouter()


@pytest.fixture()
def ffn_targets(monkeypatch):
    # `instantiate` only builds classes defined in the allowed packages; place the test FFNs in layers.mlp.
    for cls in (AuxFFN, SequenceMixingFFN):
        monkeypatch.setattr(layers.mlp, cls.__name__, cls, raising=False)
        monkeypatch.setattr(cls, "__module__", "layers.mlp")


def test_ffn_slot_collects_aux_losses_and_stats(ffn_targets):
    spec = {"target": "layers.mlp.AuxFFN", "params": {"weight": 0.5}}
    model = Transformer(16, 4, 2, True, max_len=8, ffn=spec, ffn_every=2)
    assert [type(b.ffn).__name__ for b in model.blocks] == ["MLP", "AuxFFN", "MLP", "AuxFFN"]
    x = torch.randn(2, 8, 16, requires_grad=True)
    h, aux = model(x)
    assert set(aux) == {"aux_loss", "layer1/load", "layer3/load"}
    assert aux["aux_loss"].ndim == 0 and aux["aux_loss"] > 0
    (h.sum() + aux["aux_loss"]).backward()
    assert model.blocks[1].ffn.lin.weight.grad is not None
    # incremental decoding with one token at a time goes through the FFN slot too
    cache = model.new_cache(2)
    _, step_aux = model(x[:, :1].detach(), cache)
    assert "layer1/load" in step_aux
    h_plain, aux_plain = Transformer(16, 2, 2, True, max_len=8)(x)
    assert set(aux_plain) == {"aux_loss"} and aux_plain["aux_loss"].item() == 0.0


def test_causal_transformer_refuses_sequence_mixing_ffn(ffn_targets):
    spec = {"target": "layers.mlp.SequenceMixingFFN"}
    with pytest.raises(ValueError, match="block 1.*SequenceMixingFFN.*LeakyRouter"):
        Transformer(16, 2, 2, True, max_len=8, ffn=spec, ffn_every=2)
    Transformer(16, 2, 2, False, max_len=8, ffn=spec)  # bidirectional is fine


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="positions"):
        Transformer(16, 1, 2, True, positions="alibi", max_len=4)
    with pytest.raises(ValueError, match="grid"):
        Transformer(16, 1, 2, True, positions="rope2d")
    with pytest.raises(ValueError, match="divisible"):
        Transformer(18, 1, 4, True, max_len=4)
