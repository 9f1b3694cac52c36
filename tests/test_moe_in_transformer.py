"""Every MoE layer of issue 21 drops into a causal transformer's FFN slot from a YAML-style spec:
it trains (aux losses summed, statistics reported per layer) and cached decoding reproduces the
full forward pass."""

from __future__ import annotations

import pytest
import torch

transformer = pytest.importorskip("layers.transformer")

D = 16
SPECS = {
    "DeepSeekMoE": {"target": "layers.moe.DeepSeekMoE",
                    "params": {"num_experts": 4, "top_k": 1, "hidden_dim": 32, "granularity": 2, "num_shared": 1}},
    "MultiHeadMoE": {"target": "layers.moe.MultiHeadMoE", "params": {"heads": 2, "num_experts": 4, "top_k": 2}},
    "PEER": {"target": "layers.moe.PEER", "params": {"num_experts": 64, "top_k": 4, "heads": 2}},
    "SparseMixerRouter": {"target": "layers.moe.MoE", "params": {
        "num_experts": 4, "hidden_dim": 24, "router": {"target": "layers.moe.SparseMixerRouter"}}},
    "StableMoERouter": {"target": "layers.moe.MoE", "params": {
        "num_experts": 4, "top_k": 1, "hidden_dim": 24, "router": {"target": "layers.moe.StableMoERouter"}}},
}


@pytest.mark.parametrize("name", list(SPECS))
def test_moe_layer_in_a_causal_transformer(name):
    torch.manual_seed(0)
    model = transformer.Transformer(D, 2, 2, causal=True, ffn=SPECS[name], max_len=8)
    x = torch.randn(2, 8, D)
    h, aux = model(x)
    (h.square().mean() + aux["aux_loss"]).backward()
    assert any(k.startswith("layer0/") for k in aux) and torch.isfinite(aux["aux_loss"])
    assert all(p.grad is not None for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(x)[0]
        cache = model.new_cache(2)
        steps = [model(x[:, :3], cache)[0]] + [model(x[:, t:t + 1], cache)[0] for t in range(3, 8)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=0, atol=1e-5)
