"""FSQ, LFQ, residual and grouped quantizers: contract, codes, entropy maths, training behaviour."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from stage1.quantizers.base import Quantizer
from stage1.quantizers.fsq import FSQ
from stage1.quantizers.grouped import GroupedQuantizer
from stage1.quantizers.lfq import LFQ
from stage1.quantizers.residual import ResidualQuantizer


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """These tensors are tiny: one intra-op thread avoids OpenMP barrier stalls on a shared, loaded CPU
    (measured here: a 512x2 @ 2x2 matmul took ~45 ms with 2 threads under load, 5 us with 1)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


FSQ_SPEC = {"target": "stage1.quantizers.fsq.FSQ", "params": {"levels": [5, 5, 5]}}
LFQ_SPEC = {"target": "stage1.quantizers.lfq.LFQ", "params": {"bits": 4}}

# name -> constructor; every one takes 8 channels so the generic tests share inputs.
FACTORIES = {
    "fsq": lambda: FSQ([8, 5, 5], dim=8),
    "fsq_noproj": lambda: FSQ([8, 5, 5, 3, 3, 3, 3, 3]),
    "lfq": lambda: LFQ(6, dim=8),
    "lfq_noproj": lambda: LFQ(8),
    "residual": lambda: ResidualQuantizer(8, depth=3, quantizer=FSQ_SPEC, level_scale=3.0),
    "residual_shared_lfq": lambda: ResidualQuantizer(8, depth=2, quantizer=LFQ_SPEC, shared_codebook=True),
    "grouped": lambda: GroupedQuantizer(8, groups=2, quantizer=FSQ_SPEC),
    "grouped_lfq": lambda: GroupedQuantizer(8, groups=4, quantizer=LFQ_SPEC),
}


def make(name: str, seed: int = 0) -> Quantizer:
    torch.manual_seed(seed)
    return FACTORIES[name]()


def expected_code_shape(q: Quantizer, z: torch.Tensor) -> tuple[int, ...]:
    base = (z.shape[0], *z.shape[2:])
    return base if q.depth is None else (*base, q.depth)


@pytest.mark.parametrize("name", FACTORIES)
@pytest.mark.parametrize("grid", [(12,), (5, 6), (2, 3, 4)], ids=["1d", "2d", "3d"])
def test_shapes_round_trip_and_gradient(name: str, grid: tuple[int, ...]) -> None:
    q = make(name)
    z = torch.randn(3, 8, *grid, requires_grad=True)
    out = q(z)
    assert out.z_q.shape == z.shape
    assert out.codes.shape == expected_code_shape(q, z)
    assert out.codes.dtype == torch.long
    assert int(out.codes.min()) >= 0 and int(out.codes.max()) < q.codebook_size
    assert out.loss.dim() == 0 and torch.isfinite(out.loss)
    assert 0 < float(out.stats["usage"]) <= 1 and float(out.stats["perplexity"]) >= 1
    (out.z_q.square().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0

    q.eval()
    with torch.no_grad():
        out = q(z)
        codes = q.encode(z)
        assert torch.equal(codes, out.codes)
        torch.testing.assert_close(q.decode(codes).float(), out.z_q.float(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", FACTORIES)
def test_state_dict_round_trip(name: str) -> None:
    q = make(name, seed=1)
    z = torch.randn(2, 8, 4, 4)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = make(name, seed=2)
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    q.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(q.encode(z), fresh.encode(z))
        torch.testing.assert_close(q(z).z_q, fresh(z).z_q)


@pytest.mark.parametrize("name", FACTORIES)
def test_bf16_autocast_trains(name: str) -> None:
    q = make(name)
    proj = torch.nn.Conv2d(4, 8, 1)
    params = [*q.parameters(), *proj.parameters()]
    opt = torch.optim.SGD(params, lr=1e-2)
    x = torch.randn(2, 4, 4, 4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        z = proj(x)
        assert z.dtype == torch.bfloat16
        out = q(z)
        loss = F.mse_loss(out.z_q.float(), z.float()) + out.loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert proj.weight.grad is not None and torch.isfinite(proj.weight.grad).all()
    assert all(torch.isfinite(p).all() for p in params)


def toy_batch(n: int, dim: int = 8, seed: int = 0) -> torch.Tensor:
    """Fixed toy distribution: 16 well-separated Gaussian clusters in ``dim`` dimensions."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(16, dim, generator=g)
    labels = torch.randint(0, 16, (n,), generator=g)
    rows = centres[labels] + 0.05 * torch.randn(n, dim, generator=g)
    return rows.T.reshape(1, dim, n)  # (B=1, C, grid=n): a 1-D latent


@pytest.mark.parametrize("name", ["fsq", "lfq", "residual", "grouped_lfq"])
def test_optimisation_reduces_error(name: str) -> None:
    """A learnable projection pair around the quantizer learns to reconstruct the toy data."""
    torch.manual_seed(0)
    q = make(name)
    enc, dec = torch.nn.Conv1d(8, 8, 1), torch.nn.Conv1d(8, 8, 1)
    opt = torch.optim.Adam([*q.parameters(), *enc.parameters(), *dec.parameters()], lr=1e-2)
    z = toy_batch(512)

    def recon_error() -> float:
        q.eval()
        with torch.no_grad():
            err = F.mse_loss(dec(q.decode(q.encode(enc(z)))), z).item()
        q.train()
        return err

    before = recon_error()
    for _ in range(150):
        out = q(enc(z))
        loss = F.mse_loss(dec(out.z_q), z) + out.loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = recon_error()
    assert after < 0.5 * before, (before, after)


# -- FSQ ------------------------------------------------------------------------------------------
def fsq_level_preimages(q: FSQ) -> list[torch.Tensor]:
    """Per channel, one input value that bounds and rounds to each integer level."""
    out = []
    for i, level in enumerate(q.levels):
        ints = torch.arange(level, dtype=torch.float32) - level // 2
        out.append(torch.atanh((ints + q._offset[i]) / q._half_l[i]) - q._shift[i])
    return out


@pytest.mark.parametrize("levels", [[8, 5, 5, 5], [2, 3, 4], [7, 6]])
def test_fsq_enumerates_exactly_prod_levels(levels: list[int]) -> None:
    q = FSQ(levels)
    grid = torch.cartesian_prod(*fsq_level_preimages(q))  # (prod(levels), d)
    codes = q.encode(grid.T.unsqueeze(0))
    assert q.codebook_size == math.prod(levels)
    assert codes.unique().numel() == math.prod(levels)
    # The bound cannot reach beyond the grid: extreme inputs still give valid codes.
    extreme = q.encode(torch.tensor([-1e4, 1e4]).repeat(len(levels), 1).unsqueeze(0))
    assert int(extreme.min()) >= 0 and int(extreme.max()) < q.codebook_size
    # Every channel's rounded values are exactly `level` values, normalised into [-1, 1].
    values = q.indices_to_codes(torch.arange(q.codebook_size))
    for i, level in enumerate(levels):
        assert values[:, i].unique().numel() == level
    assert values.abs().max() <= 1


def test_fsq_indices_codes_bijection() -> None:
    q = FSQ([8, 5, 5, 5])
    idx = torch.arange(q.codebook_size)
    values = q.indices_to_codes(idx)
    assert torch.equal(q.codes_to_indices(values), idx)
    assert torch.unique(values, dim=0).shape[0] == q.codebook_size
    # Mixed radix: the first channel is the least significant digit.
    assert torch.equal(q.codes_to_indices(q.indices_to_codes(torch.tensor([1]))), torch.tensor([1]))
    assert values[1, 0] > values[0, 0] and torch.equal(values[1, 1:], values[0, 1:])


def test_fsq_zero_maps_to_zero_and_no_parameters_or_loss() -> None:
    q = FSQ([8, 5, 4])
    out = q(torch.zeros(1, 3, 2))
    assert torch.equal(out.z_q, torch.zeros(1, 3, 2))  # even levels too, thanks to the shift
    assert float(out.loss) == 0.0
    assert list(q.parameters()) == [] and q.state_dict() == {}


def reference_projected_fsq(q: FSQ, z: torch.Tensor) -> torch.Tensor:
    """FSQ with projections written with plain autograd ops, as the paper states it."""
    h = torch.einsum("cd,bdl->bcl", q.project_in.weight, z) + q.project_in.bias.view(1, -1, 1)
    quantized = q.quantize(h, axis=1)
    return torch.einsum("dc,bcl->bdl", q.project_out.weight, quantized) + q.project_out.bias.view(1, -1, 1)


@pytest.mark.parametrize("input_layout", ["channel_first", "channels_last"])
@pytest.mark.parametrize("grad_layout", ["channel_first", "channels_last"])
def test_fsq_fused_step_matches_plain_autograd(input_layout: str, grad_layout: str) -> None:
    """The hand-written forward/backward equals autograd on the composed ops, whatever the memory layouts."""
    torch.manual_seed(0)
    q = FSQ([8, 5, 5, 4], dim=12)
    raw = torch.randn(3, 12, 10) * 2
    z = raw.clone() if input_layout == "channel_first" else raw.transpose(1, 2).contiguous().transpose(1, 2)
    z.requires_grad_(True)
    upstream = torch.randn(3, 12, 10)
    if grad_layout == "channels_last":
        upstream = upstream.transpose(1, 2).contiguous().transpose(1, 2)

    out = q(z)
    out.z_q.backward(upstream)
    fused = [z.grad.clone()] + [p.grad.clone() for p in q.parameters()]

    z_ref = raw.clone().requires_grad_(True)
    q.zero_grad()
    expected = reference_projected_fsq(q, z_ref)
    expected.backward(upstream)
    reference = [z_ref.grad] + [p.grad for p in q.parameters()]

    torch.testing.assert_close(out.z_q, expected, rtol=1e-5, atol=1e-5)
    for got, want in zip(fused, reference, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    # Codes agree with the plain mixed-radix conversion of the rounded grid values.
    grid = q.quantize(torch.einsum("cd,bdl->bcl", q.project_in.weight, raw) + q.project_in.bias.view(1, -1, 1), axis=1)
    assert torch.equal(out.codes, q.codes_to_indices(grid, axis=1))


# -- LFQ ------------------------------------------------------------------------------------------
def test_lfq_codes_are_integers_of_bits() -> None:
    q = LFQ(5, codebook_scale=0.5)
    bits = torch.tensor([[1, 0, 1, 1, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]])
    z = (bits.float() * 2 - 1) * torch.rand(3, 5).add(0.1)  # signs from the bits, random magnitudes
    codes = q.encode(z.T.unsqueeze(0)).squeeze(0)
    assert codes.tolist() == [1 + 4 + 8, 0, 31]
    decoded = q.decode(codes.unsqueeze(0)).squeeze(0).T
    assert torch.equal(decoded, (bits.float() * 2 - 1) * 0.5)


@pytest.mark.parametrize("bits,scale,temperature", [(4, 1.0, 0.01), (8, 1.0, 1.0), (10, 0.5, 0.3)])
def test_lfq_factorised_entropy_matches_exact_table(bits: int, scale: float, temperature: float) -> None:
    torch.manual_seed(bits)
    q = LFQ(bits, codebook_scale=scale, temperature=temperature, exact_chunk=37)
    rows = torch.randn(200, bits) * 0.3
    per_f, batch_f = q.factorised_entropies(rows)
    per_e, batch_e = q.exact_entropies(rows)
    torch.testing.assert_close(per_f, per_e, rtol=1e-4, atol=1e-4)
    # Up to 9 bits the default grouping is one group (exact); beyond, the sum over groups upper-bounds
    # the true batch entropy (subadditivity), and both are <= log K.
    if bits <= 9:
        torch.testing.assert_close(batch_f, batch_e, rtol=1e-4, atol=1e-4)
    assert batch_e <= batch_f + 1e-4 <= bits * math.log(2) + 1e-3
    # Chunking changes nothing.
    q.exact_chunk = 10_000
    per_e2, batch_e2 = q.exact_entropies(rows)
    torch.testing.assert_close((per_e, batch_e), (per_e2, batch_e2))


def brute_force_batch_entropy(rows: torch.Tensor, scale: float, temperature: float) -> torch.Tensor:
    """H(E_n[softmax_c(-||z_n - c||^2 / T)]) over every code c in {-s, s}^D, by enumeration."""
    bits = rows.shape[1]
    powers = 2 ** torch.arange(bits)
    codes = torch.where((torch.arange(2**bits).unsqueeze(1) & powers) != 0, scale, -scale)
    probs = torch.softmax(-torch.cdist(rows, codes).square() / temperature, dim=1)
    avg = probs.mean(0)
    return -(avg * avg.clamp_min(1e-12).log()).sum()


def test_lfq_default_batch_entropy_is_the_code_distributions_entropy() -> None:
    """Two always-equal bits carry one bit of batch entropy, not two (the per-bit marginals said two)."""
    torch.manual_seed(0)
    q = LFQ(4)  # class defaults: the default batch term
    rows = torch.randn(300, 4)
    rows[:, 1] = rows[:, 0]
    _, batch = q.factorised_entropies(rows)
    torch.testing.assert_close(batch, brute_force_batch_entropy(rows, 1.0, q.temperature), rtol=1e-5, atol=1e-5)
    assert 2.8 * math.log(2) < batch < 3.05 * math.log(2)  # 3 independent bits, nearly uniform
    out = q(rows.T.unsqueeze(0))
    torch.testing.assert_close(out.stats["entropy_batch"], batch)


@pytest.mark.parametrize(
    "bits,group_bits,sizes", [(10, 4, [4, 3, 3]), (14, 9, [7, 7]), (18, 9, [9, 9]), (6, 1, [1] * 6)]
)
def test_lfq_grouped_batch_entropy_and_gradient_match_enumeration(bits: int, group_bits: int, sizes: list[int]) -> None:
    """Per bit-factorised sub-code: the sum over groups of each group's exact batch entropy (value and gradient)."""
    torch.manual_seed(bits)
    q = LFQ(bits, temperature=0.7, codebook_scale=0.5, entropy_group_bits=group_bits)
    assert q.entropy_groups == sizes
    rows = (0.4 * torch.randn(64, bits)).requires_grad_(True)
    _, batch = q.factorised_entropies(rows)
    (grad,) = torch.autograd.grad(batch, rows)
    ref_rows = rows.detach().clone().requires_grad_(True)
    reference = sum(
        brute_force_batch_entropy(part, 0.5, 0.7) for part in ref_rows.split(sizes, dim=1)
    )
    (ref_grad,) = torch.autograd.grad(reference, ref_rows)
    torch.testing.assert_close(batch, reference.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_lfq_entropy_bounds_order_exact_grouped_marginal() -> None:
    torch.manual_seed(0)
    rows = torch.randn(200, 8) @ torch.randn(8, 8) * 0.3  # correlated bits
    batch = {g: LFQ(8, temperature=0.3, entropy_group_bits=g).factorised_entropies(rows)[1] for g in (1, 4, 8)}
    exact = LFQ(8, temperature=0.3).exact_entropies(rows)[1]
    torch.testing.assert_close(batch[8], exact, rtol=1e-5, atol=1e-5)
    assert exact <= batch[4] + 1e-5 <= batch[1] + 2e-5
    marginals = torch.sigmoid(4 * rows / 0.3).mean(0)
    torch.testing.assert_close(batch[1], -(marginals * marginals.log() + (1 - marginals) * (1 - marginals).log()).sum())


def test_lfq_exact_path_refuses_large_codebooks_and_trains() -> None:
    with pytest.raises(ValueError, match="bits <= 12"):
        LFQ(14, exact_entropy=True)
    q = LFQ(6, dim=8, exact_entropy=True)
    z = torch.randn(2, 8, 5, requires_grad=True)
    q(z).loss.backward()
    assert z.grad.abs().sum() > 0


def test_lfq_18_bits_on_16k_vectors() -> None:
    q = LFQ(18)
    z = torch.randn(16384, 18, 1, requires_grad=True)
    out = q(z)
    out.loss.backward()
    assert out.codes.shape == (16384, 1) and int(out.codes.max()) < 2**18
    assert torch.isfinite(z.grad).all()
    # Random signs over 2^18 codes: almost every one of 16k vectors gets its own code.
    assert float(out.stats["usage"]) * 2**18 > 15000


def test_lfq_entropy_loss_spreads_codes() -> None:
    """With the diversity term, a collapsed projection learns to use many codes."""
    torch.manual_seed(0)
    q = LFQ(4, dim=8, beta=0.0, entropy_weight=1.0, temperature=1.0)
    with torch.no_grad():
        q.project_in.bias.fill_(0.5)  # every bit starts positive: one code in use
    z = toy_batch(256).mul(0.1)
    assert q.encode(z).unique().numel() == 1
    opt = torch.optim.Adam(q.parameters(), lr=5e-2)
    for _ in range(60):
        loss = q(z).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    # 4 bits, 16 clusters: the batch term is the entropy of the 16-code distribution (one group).
    assert q.encode(z).unique().numel() >= 6


# -- residual -------------------------------------------------------------------------------------
def test_residual_error_falls_with_depth_and_prefix_decode() -> None:
    torch.manual_seed(0)
    z = torch.rand(4, 3, 50) * 1.8 - 0.9
    errors = []
    for depth in (1, 2, 3, 4):
        rq = ResidualQuantizer(3, depth=depth, quantizer=FSQ_SPEC, level_scale=3.0).eval()
        errors.append(F.mse_loss(rq(z).z_q, z).item())
    assert all(b < 0.5 * a for a, b in zip(errors, errors[1:])), errors

    codes = rq.encode(z)
    prefix_errors = [F.mse_loss(rq.decode(codes, levels=d), z).item() for d in (1, 2, 3, 4)]
    torch.testing.assert_close(torch.tensor(prefix_errors), torch.tensor(errors), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(rq.decode(codes, levels=1), rq.level(0).decode(codes[..., 0]))
    with pytest.raises(ValueError):
        rq.decode(codes, levels=5)


def test_quantizer_dropout_only_in_training() -> None:
    torch.manual_seed(0)
    rq = ResidualQuantizer(3, depth=4, quantizer=FSQ_SPEC, dropout_prob=1.0, level_scale=3.0)
    z = torch.randn(2, 3, 10)
    rq.train()
    active = set()
    for _ in range(40):
        out = rq(z)
        n = int(out.stats["active_levels"])
        active.add(n)
        assert (out.codes[..., :n] >= 0).all() and (out.codes[..., n:] == -1).all()
        assert f"usage_level{n - 1}" in out.stats and f"usage_level{n}" not in out.stats
        # Decoding the codes of a dropped-out batch skips the unused levels.
        torch.testing.assert_close(rq.decode(out.codes), out.z_q.detach())
    assert active == {1, 2, 3, 4}
    rq.eval()
    for _ in range(10):
        out = rq(z)
        assert int(out.stats["active_levels"]) == 4 and (out.codes >= 0).all()
    rq_no_drop = ResidualQuantizer(3, depth=4, quantizer=FSQ_SPEC).train()
    assert all(int(rq_no_drop(z).stats["active_levels"]) == 4 for _ in range(10))


def test_residual_shared_vs_separate_and_stats() -> None:
    shared = ResidualQuantizer(8, depth=3, quantizer=LFQ_SPEC, shared_codebook=True)
    separate = ResidualQuantizer(8, depth=3, quantizer=LFQ_SPEC)
    assert len(shared.quantizers) == 1 and shared.level(2) is shared.level(0)
    assert len(separate.quantizers) == 3 and separate.level(2) is not separate.level(0)
    n_one = sum(p.numel() for p in shared.quantizers[0].parameters())
    assert sum(p.numel() for p in shared.parameters()) == n_one > 0
    assert sum(p.numel() for p in separate.parameters()) == 3 * n_one
    assert shared.depth == 3 and shared.codebook_size == 16 and shared.quantizers[0].dim == 8
    out = separate(torch.randn(2, 8, 6))
    for i in range(3):
        assert {f"usage_level{i}", f"perplexity_level{i}", f"entropy_per_sample_level{i}"} <= set(out.stats)
    mean_usage = sum(float(out.stats[f"usage_level{i}"]) for i in range(3)) / 3
    assert float(out.stats["usage"]) == pytest.approx(mean_usage)
    # The loss is the sum of the levels' losses (LFQ's includes its entropy term in training).
    assert out.loss.requires_grad


def test_residual_rejects_conflicting_dim() -> None:
    with pytest.raises(ValueError, match="dim"):
        ResidualQuantizer(
            8, depth=2, quantizer={"target": "stage1.quantizers.lfq.LFQ", "params": {"bits": 4, "dim": 4}}
        )


# -- grouped --------------------------------------------------------------------------------------
def test_grouped_splits_channels() -> None:
    torch.manual_seed(0)
    gq = GroupedQuantizer(12, groups=3, quantizer=FSQ_SPEC)
    assert gq.depth == 3 and gq.codebook_size == 125
    assert all(sub.dim == 4 and sub.project_in.in_features == 4 for sub in gq.quantizers)
    z = torch.randn(2, 12, 5, 5)
    codes = gq.encode(z)
    for i in range(3):
        assert torch.equal(codes[..., i], gq.quantizers[i].encode(z[:, 4 * i : 4 * i + 4]))
    # Changing only the middle group's channels changes only the middle group's codes.
    z2 = z.clone()
    z2[:, 4:8] = torch.randn(2, 4, 5, 5)
    codes2 = gq.encode(z2)
    assert torch.equal(codes2[..., 0], codes[..., 0]) and torch.equal(codes2[..., 2], codes[..., 2])
    assert not torch.equal(codes2[..., 1], codes[..., 1])
    out = gq(z)
    assert {"usage_group0", "usage_group2", "perplexity_group1", "usage", "perplexity"} <= set(out.stats)
    with pytest.raises(ValueError, match="split"):
        GroupedQuantizer(10, groups=3, quantizer=FSQ_SPEC)


def test_residual_vq_error_falls_with_depth() -> None:
    """RQ-VAE proper: each level a k-means-initialised VectorQuantizer on the previous level's residual."""
    spec = {"target": "stage1.quantizers.vq.VectorQuantizer", "params": {"codebook_size": 16, "kmeans_init": True}}
    torch.manual_seed(0)
    z = torch.randn(4, 6, 64)
    rq = ResidualQuantizer(6, depth=4, quantizer=spec)
    rq.train()
    rq(z)  # first training batch: k-means initialises every level on its own residuals
    rq.eval()
    codes = rq.encode(z)
    assert codes.shape == (4, 64, 4) and int(codes.max()) < 16
    errors = [F.mse_loss(rq.decode(codes, levels=d), z).item() for d in (1, 2, 3, 4)]
    assert all(b < 0.7 * a for a, b in zip(errors, errors[1:])), errors
    torch.testing.assert_close(rq.decode(codes), rq(z).z_q)
