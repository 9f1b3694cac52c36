"""Codebook-learning quantizers beyond plain VQ: CVQ, SimVQ, IBQ, OptVQ, Gumbel."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F

from layers.instantiate import instantiate
from stage1.quantizers._vq_ops import kmeans
from stage1.quantizers.base import Quantizer, to_rows
from stage1.quantizers.cvq import ClusteredVQ, closest_row_per_code
from stage1.quantizers.gumbel import GumbelQuantizer
from stage1.quantizers.ibq import IndexBackpropQuantizer
from stage1.quantizers.optvq import OptVQ, sinkhorn_assign
from stage1.quantizers.simvq import SimVQ
from stage1.quantizers.vq import VectorQuantizer

DIM, K = 8, 16
FACTORIES: dict[str, Callable[[], Quantizer]] = {
    "cvq_closest": lambda: ClusteredVQ(DIM, K),
    "cvq_random_cosine_contrastive": lambda: ClusteredVQ(
        DIM, K, anchor="random", distance="cosine", contrastive_weight=0.1
    ),
    "simvq": lambda: SimVQ(DIM, K),
    "simvq_rotation": lambda: SimVQ(DIM, K, rotation_trick=True),
    "ibq": lambda: IndexBackpropQuantizer(DIM, K, entropy_weight=0.01),
    "optvq": lambda: OptVQ(DIM, K),
    "gumbel": lambda: GumbelQuantizer(DIM, K),
}


def _make(name: str) -> Quantizer:
    torch.manual_seed(0)
    return FACTORIES[name]()


def _toy(n: int = 128, batch: int = 2, centres: int = 12, seed: int = 1) -> torch.Tensor:
    """Unit-norm clustered rows as a channel-first 1-D latent (reachable by every quantizer, cosine too)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(centres, DIM, generator=g)
    rows = mu[torch.randint(0, centres, (n,), generator=g)] + 0.05 * torch.randn(n, DIM, generator=g)
    rows = F.normalize(rows, dim=1)
    return rows.reshape(batch, -1, DIM).movedim(-1, 1)


# ------------------------------------------------------------------ contract, every quantizer
@pytest.mark.parametrize("name", list(FACTORIES))
@pytest.mark.parametrize("grid", [(7,), (3, 4), (2, 2, 3)])
def test_round_trip_shapes_and_gradient(name: str, grid: tuple[int, ...]) -> None:
    q = _make(name).train()
    z = torch.randn(2, DIM, *grid, requires_grad=True)
    out = q(z)
    assert out.z_q.shape == z.shape and out.codes.shape == (2, *grid) and out.loss.dim() == 0
    assert out.codes.dtype == torch.long and {"perplexity", "usage"} <= set(out.stats)
    (out.z_q.square().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        ev = q(z)
        assert torch.equal(q.encode(z), ev.codes)
        assert torch.equal(q.decode(q.encode(z)), ev.z_q)
    assert torch.equal(q(z).z_q.detach(), ev.z_q)  # eval with autograd on: same values


@pytest.mark.parametrize("name", list(FACTORIES))
def test_state_dict_round_trip(name: str) -> None:
    q = _make(name).train()
    z = torch.randn(2, DIM, 4, 4)
    for _ in range(2):
        q(z)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(123)  # a different random init that the load must overwrite
    fresh = FACTORIES[name]()
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    q.eval(), fresh.eval()
    assert torch.equal(fresh.encode(z), q.encode(z))
    assert torch.equal(fresh.decode(fresh.encode(z)), q.decode(q.encode(z)))


@pytest.mark.parametrize("name", list(FACTORIES))
def test_training_reduces_quantization_error(name: str) -> None:
    q = _make(name)
    z = _toy()
    opt = torch.optim.Adam(q.parameters(), lr=0.05)

    def error() -> float:
        with torch.no_grad():
            return F.mse_loss(q.eval().decode(q.encode(z)), z).item()

    start = error()
    q.train()
    for _ in range(20):
        out = q(z)
        opt.zero_grad()
        (out.loss + F.mse_loss(out.z_q, z)).backward()  # identity encoder/decoder around the quantizer
        opt.step()
    assert error() < 0.6 * start


@pytest.mark.parametrize("name", list(FACTORIES))
def test_bf16_autocast(name: str) -> None:
    q = _make(name).train()
    z = torch.randn(2, DIM, 3, 3)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
        out_eval = q.eval()(z.bfloat16())
    assert out.z_q.dtype == torch.bfloat16 and torch.isfinite(out.loss) and torch.isfinite(out.z_q.float()).all()
    assert out_eval.codes.shape == (2, 3, 3)


@pytest.mark.parametrize(
    "target",
    [
        "stage1.quantizers.cvq.ClusteredVQ",
        "stage1.quantizers.simvq.SimVQ",
        "stage1.quantizers.ibq.IndexBackpropQuantizer",
        "stage1.quantizers.optvq.OptVQ",
        "stage1.quantizers.gumbel.GumbelQuantizer",
        "stage1.quantizers.vq.VectorQuantizer",
    ],
)
def test_selectable_from_config(target: str) -> None:
    q = instantiate({"target": target, "params": {"dim": DIM, "codebook_size": K}}, where="model.quantizer")
    assert isinstance(q, Quantizer) and q.codebook.shape[0] == K


# ------------------------------------------------------------------ method-specific behaviour
def test_sinkhorn_assignment_is_balanced_on_uniform_data() -> None:
    torch.manual_seed(0)
    n, k = 2048, 16
    rows = torch.rand(n, 2)
    codes = 0.2 * torch.randn(k, 2) + 0.5  # bunched in the middle: nearest neighbour is lopsided
    cost = torch.cdist(rows, codes)
    cost = (cost - cost.mean()) / cost.std()
    nearest = torch.bincount(cost.argmin(1), minlength=k)
    balanced = torch.bincount(sinkhorn_assign(cost, epsilon=0.02, iters=100), minlength=k)
    target = n / k
    assert nearest.max() > 2 * target or nearest.min() < 0.5 * target  # the baseline really is unbalanced
    # The plan is soft (entropic), so its per-row argmax is balanced up to rows on the boundaries.
    assert balanced.min() >= 0.75 * target and balanced.max() <= 1.25 * target


def test_optvq_trains_with_sinkhorn_and_infers_nearest() -> None:
    torch.manual_seed(0)
    q = OptVQ(DIM, K, kmeans_init=False).train()  # random codes: nearest neighbour leaves some unused
    z = torch.randn(2, DIM, 64)
    train_codes = q(z).codes
    q.eval()
    rows = to_rows(z)[0]
    nearest = torch.cdist(rows, q.codebook).argmin(1)
    assert torch.equal(q.encode(z).reshape(-1), nearest)
    assert not torch.equal(train_codes.reshape(-1), nearest)  # the training assignment is transport, not NN
    assert q.train()(z).stats["usage"] > q.eval()(z).stats["usage"]


def test_optvq_multi_head_codes_share_one_codebook() -> None:
    torch.manual_seed(0)
    q = OptVQ(DIM, K, num_heads=4, kmeans_init=False)
    assert q.depth == 4 and q.codebook.shape == (K, DIM // 4) and q.embed.shape == (K, DIM // 4)
    z = torch.randn(2, DIM, 3, 5)
    out = q.train()(z)
    assert out.codes.shape == (2, 3, 5, 4) and out.z_q.shape == z.shape
    q.eval()
    codes = q.encode(z)
    heads = z.movedim(1, -1).reshape(2, 3, 5, 4, DIM // 4)  # channel c of head h is h * DIM/4 + c
    expected = torch.cdist(heads.reshape(-1, DIM // 4), q.codebook).argmin(1).view(2, 3, 5, 4)
    assert torch.equal(codes, expected)
    decoded = q.decode(codes)
    torch.testing.assert_close(decoded, q.codebook[codes].reshape(2, 3, 5, DIM).movedim(-1, 1))
    torch.testing.assert_close(q(z).z_q, decoded)
    with pytest.raises(ValueError, match="heads"):
        OptVQ(DIM, K, num_heads=3)


def test_optvq_kmeans_init_waits_for_k_rows_then_sets_the_looked_up_codes() -> None:
    torch.manual_seed(0)
    q = OptVQ(DIM, K, num_heads=2).train()
    first = torch.randn(1, DIM, 4)
    q(first)  # 8 head rows < K = 16: not yet
    assert not bool(q.initialized)
    z = _toy(n=64)  # 128 more head rows
    torch.manual_seed(5)
    q(z)
    assert bool(q.initialized)
    seen = torch.cat([first.movedim(1, -1).reshape(-1, DIM // 2), z.movedim(1, -1).reshape(-1, DIM // 2)])
    torch.manual_seed(5)
    centroids, _ = kmeans(seen, K, q.kmeans_iters)
    torch.testing.assert_close(q.codebook, centroids)  # the looked-up codes are the centroids
    torch.testing.assert_close(q.code_proj.weight, torch.eye(DIM // 2))


def test_optvq_loss_and_gradients_match_the_paper() -> None:
    """``||z - sg(q)||^2 + beta ||sg(z) - q||^2`` with beta = 0.25, q = code_proj(E)[idx], straight-through z_q."""
    torch.manual_seed(0)
    q = OptVQ(DIM, K, kmeans_init=False).train()
    assert q.beta == 0.25
    z = torch.randn(1, DIM, 12, requires_grad=True)
    upstream = torch.randn(1, DIM, 12)
    out = q(z)
    ((out.z_q * upstream).sum() + out.loss).backward()

    embed = q.embed.detach().clone().requires_grad_(True)
    weight = q.code_proj.weight.detach().clone().requires_grad_(True)
    bias = q.code_proj.bias.detach().clone().requires_grad_(True)
    rows = to_rows(z.detach())[0].requires_grad_(True)
    codes = embed @ weight.t() + bias
    picked = codes[out.codes.reshape(-1)]
    loss = F.mse_loss(rows, picked.detach()) + 0.25 * F.mse_loss(rows.detach(), picked)
    z_q = rows + (picked - rows).detach()
    ((z_q * to_rows(upstream)[0]).sum() + loss).backward()
    torch.testing.assert_close(out.loss, loss.detach())
    torch.testing.assert_close(to_rows(z.grad)[0], rows.grad)
    torch.testing.assert_close(q.embed.grad, embed.grad)
    torch.testing.assert_close(q.code_proj.weight.grad, weight.grad)
    torch.testing.assert_close(q.code_proj.bias.grad, bias.grad)


def test_closest_row_per_code_matches_brute_force() -> None:
    torch.manual_seed(0)
    rows, codes = torch.randn(300, 5), torch.randn(40, 5)
    expected = torch.cdist(codes, rows).argmin(1)
    assert torch.equal(closest_row_per_code(rows, codes, cosine=False, chunk_rows=7), expected)
    nr, nc = F.normalize(rows, dim=1), F.normalize(codes, dim=1)
    assert torch.equal(closest_row_per_code(nr, nc, cosine=True, chunk_rows=64), (nc @ nr.t()).argmax(1))


def test_cvq_pulls_dead_codes_onto_features() -> None:
    z = _toy(centres=16)
    rows = to_rows(z)[0]
    usage = {}
    for name, q in (("vq", VectorQuantizer(DIM, K, codebook="gradient")), ("cvq", ClusteredVQ(DIM, K))):
        torch.manual_seed(0)
        q.embed.data.normal_().add_(5.0)  # codebook off the data: plain VQ leaves most codes dead
        q.train()(z)
        dist_to_data = torch.cdist(q.codebook, rows).min(1).values
        usage[name] = q.eval()(z).stats["usage"].item()
        if name == "cvq":  # every unused code now sits on a batch feature (up to the 1 - e^-1e-3 keep)
            assert (dist_to_data < 0.05).sum() >= K - 1
    assert usage["cvq"] >= 0.4 and usage["vq"] <= 2 / K


def test_simvq_codebook_is_frozen_basis_times_learnt_linear() -> None:
    q = _make("simvq")
    assert "embed" in dict(q.named_buffers()) and "embed" not in dict(q.named_parameters())
    before = q.codebook.clone()
    opt = torch.optim.SGD(q.parameters(), lr=0.1)
    out = q(torch.randn(1, DIM, 3))  # at most 3 codes selected
    out.loss.backward()
    opt.step()
    moved = (q.codebook - before).norm(dim=1) > 0
    assert out.stats["usage"] <= 3 / K and moved.all()  # one linear layer moves every code


def _usage_after_training(make: Callable[[], Quantizer], steps: int = 300, seed: int = 0) -> float:
    """Fraction of codes a tiny linear autoencoder uses after training on 64 well-separated clusters."""
    torch.manual_seed(seed)
    centres = torch.randn(64, 8) * 2
    enc, dec, q = torch.nn.Conv1d(8, 8, 1), torch.nn.Conv1d(8, 8, 1), make()
    opt = torch.optim.Adam([*enc.parameters(), *dec.parameters(), *q.parameters()], lr=3e-3)
    for _ in range(steps):
        x = (centres[torch.randint(0, 64, (256,))] + 0.1 * torch.randn(256, 8)).T.unsqueeze(0)
        out = q(enc(x))
        loss = F.mse_loss(dec(out.z_q), x) + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        x = (centres.repeat(16, 1) + 0.1 * torch.randn(1024, 8)).T.unsqueeze(0)
        codes = q.eval().encode(enc(x))
    return codes.unique().numel() / q.codebook_size


def test_simvq_and_rotation_trick_use_more_codes_than_plain_vq() -> None:
    """The papers' claim in miniature: same data, init and steps; only the codebook method differs."""
    plain = _usage_after_training(lambda: VectorQuantizer(8, 128, codebook="gradient"))
    simvq = _usage_after_training(lambda: SimVQ(8, 128))
    rotation = _usage_after_training(lambda: VectorQuantizer(8, 128, codebook="gradient", rotation_trick=True))
    assert simvq >= 2.5 * plain, (simvq, plain)
    assert rotation >= 1.3 * plain, (rotation, plain)


def test_codebook_init_options() -> None:
    torch.manual_seed(0)
    uniform = VectorQuantizer(DIM, 256, codebook="gradient").embed.detach()
    normal = VectorQuantizer(DIM, 256, codebook="gradient", init="normal").embed.detach()
    assert uniform.abs().max() <= 1 / 256 and uniform.std() > 0.5 / 256  # U(-1/K, 1/K), not all zero
    assert 0.8 < float(normal.std()) < 1.2
    with pytest.raises(ValueError, match="init must be"):
        VectorQuantizer(DIM, K, init="zeros")


def test_ibq_gives_every_code_a_gradient() -> None:
    z = torch.randn(1, DIM, 3)
    grads = {}
    for name, q in (("vq", VectorQuantizer(DIM, K, codebook="gradient")), ("ibq", _make("ibq"))):
        out = q(z)
        (out.z_q.square().sum() + out.loss).backward()
        grads[name] = (q.embed.grad.norm(dim=1) > 0).sum().item()
    assert grads["vq"] <= 3 and grads["ibq"] == K


def test_gumbel_temperature_anneals_and_survives_checkpoint() -> None:
    q = GumbelQuantizer(DIM, K, temperature=1.0, temperature_min=0.5, anneal_rate=0.1).train()
    z = torch.randn(2, DIM, 5)
    temps = [q(z).stats["temperature"].item() for _ in range(12)]
    assert temps[0] == 1.0 and all(a > b for a, b in zip(temps[:7], temps[1:8])) and temps[-1] == 0.5
    fresh = GumbelQuantizer(DIM, K, temperature=1.0, temperature_min=0.5, anneal_rate=0.1)
    fresh.load_state_dict(q.state_dict())
    assert int(fresh.step) == 12 and fresh.current_temperature == 0.5
    out = q(z)
    assert out.stats["kl_uniform"] >= 0
