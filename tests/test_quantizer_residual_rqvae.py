"""The residual quantizer as RQ-VAE needs it: one shared codebook, partial decoding, dropout, per-depth stats."""

from __future__ import annotations

import pytest
import torch

from stage1.quantizers._vq_ops import kmeans
from stage1.quantizers.base import to_rows, usage_stats
from stage1.quantizers.residual import ResidualQuantizer


def rq_spec(**params) -> dict:
    return {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16, **params}}


def make_rqvae(depth: int = 4, **params) -> ResidualQuantizer:
    torch.manual_seed(0)
    return ResidualQuantizer(6, depth=depth, quantizer=rq_spec(init="normal", **params), shared_codebook=True,
                             level_loss="mean")


@pytest.mark.parametrize("codebook", ["ema", "gradient"])
def test_shared_codebook_is_one_tensor(codebook: str) -> None:
    rq = make_rqvae(codebook=codebook)
    codebooks = [name for name in rq.state_dict() if name.endswith(".embed")]
    assert codebooks == ["quantizers.0.embed"]
    assert all(rq.level(i).embed is rq.level(0).embed for i in range(rq.depth))
    if codebook == "gradient":
        params = list(rq.parameters())
        assert len(params) == 1 and params[0] is rq.level(0).embed
        # One optimiser step moves that one tensor with the gradients of every level.
        out = rq.train()(torch.randn(2, 6, 8))
        out.loss.backward()
        used = out.codes.unique()
        assert (params[0].grad.norm(dim=1)[used] > 0).all()
    else:
        assert list(rq.parameters()) == []


def test_decoding_with_first_d_levels_is_the_partial_sum() -> None:
    rq = make_rqvae(depth=4)
    z = torch.randn(3, 6, 5, 2)
    for _ in range(3):
        rq.train()(z)  # move the EMA codebook off its init
    rq.eval()
    codes = rq.encode(z)
    codebook = rq.level(0).codebook
    partial = torch.zeros_like(z)
    for d in range(1, 5):
        partial = partial + codebook[codes[..., d - 1]].movedim(-1, 1)  # (B, *grid, C) -> (B, C, *grid)
        torch.testing.assert_close(rq.decode(codes, levels=d), partial)
        # A depth-d stack with the same shared codebook encodes to the same first d codes and
        # reconstructs exactly that partial sum: one model, several bitrates.
        lower = ResidualQuantizer(6, depth=d, quantizer=rq_spec(init="normal"), shared_codebook=True)
        lower.load_state_dict(rq.state_dict())
        lower.eval()
        assert torch.equal(lower.encode(z), codes[..., :d])
        torch.testing.assert_close(lower(z).z_q, partial)
    errors = [float((rq.decode(codes, levels=d) - z).square().mean()) for d in range(1, 5)]
    assert errors == sorted(errors, reverse=True)


def test_level_loss_mean_averages_the_per_depth_losses() -> None:
    z = torch.randn(2, 6, 7)
    per_level = []
    mean_rq = make_rqvae(depth=3, codebook="gradient")
    out = mean_rq.train()(z)
    residual = z
    for level in range(3):
        q = mean_rq.level(0).codebook[out.codes[..., level]].movedim(-1, 1)
        per_level.append(1.25 * (residual - q).square().mean())  # beta commitment + codebook term
        residual = residual - q
    torch.testing.assert_close(out.loss, torch.stack(per_level).mean())
    for level in range(3):
        torch.testing.assert_close(out.stats[f"commit_loss_level{level}"], per_level[level] / 1.25)
    with pytest.raises(ValueError, match="level_loss"):
        ResidualQuantizer(6, depth=2, quantizer=rq_spec(), level_loss="max")


def test_stats_per_depth_and_of_the_shared_codebook() -> None:
    rq = make_rqvae(depth=3)
    out = rq.train()(torch.randn(2, 6, 9))
    for level in range(3):
        expected = usage_stats(out.codes[..., level], 16)
        torch.testing.assert_close(out.stats[f"usage_level{level}"], expected["usage"])
        torch.testing.assert_close(out.stats[f"perplexity_level{level}"], expected["perplexity"])
    pooled = usage_stats(out.codes, 16)
    torch.testing.assert_close(out.stats["usage_codebook"], pooled["usage"])
    torch.testing.assert_close(out.stats["perplexity_codebook"], pooled["perplexity"])
    assert out.stats["usage_codebook"] >= max(out.stats[f"usage_level{i}"] for i in range(3))


def test_quantizer_dropout_with_a_shared_ema_codebook() -> None:
    rq = make_rqvae(depth=4, decay=0.5)
    rq.dropout_prob = 1.0
    z = torch.randn(2, 6, 8)
    seen = set()
    for _ in range(30):
        before = rq.level(0).cluster_size.clone()
        out = rq.train()(z)
        n = int(out.stats["active_levels"])
        seen.add(n)
        assert (out.codes[..., n:] == -1).all() and (out.codes[..., :n] >= 0).all()
        # (The EMA has moved since the forward, so compare decodes, not the forward's z_q.)
        torch.testing.assert_close(rq.decode(out.codes), rq.decode(out.codes, levels=n))
        # One EMA update per step, with the counts of the n active levels pooled.
        counts = torch.bincount(out.codes[..., :n].reshape(-1), minlength=16).float()
        torch.testing.assert_close(rq.level(0).cluster_size, 0.5 * before + 0.5 * counts)
    assert seen == {1, 2, 3, 4}


def test_kmeans_init_and_dead_code_restart_with_a_shared_codebook() -> None:
    z = torch.randn(2, 6, 32)
    rq = make_rqvae(depth=3, kmeans_init=True, kmeans_iters=4, restart_dead=True, restart_buffer_size=1024,
                    dead_threshold=0.5)
    shared = rq.level(0)
    torch.manual_seed(7)
    rq.train()(z)
    assert bool(shared.initialized)
    # k-means ran once, on the first level's input (the encoder rows), before any level looked up codes.
    torch.manual_seed(7)
    centroids, _ = kmeans(to_rows(z)[0], 16, 4)
    first = rq.eval().encode(z)[..., 0]
    assert torch.equal(first.reshape(-1), torch.cdist(to_rows(z)[0], centroids).argmin(1))
    # The restart pool got the rows of every level in that one step (pooled statistics).
    assert int(shared.restart_filled) == 3 * 64
