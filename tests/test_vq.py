"""VectorQuantizer: exact nearest-code search, codebook learning recipes and the quantizer contract."""

from __future__ import annotations

import io

import pytest
import torch
import torch.nn.functional as F

from stage1.quantizers._vq_ops import codebook_loss, nearest_code
from stage1.quantizers.base import to_rows
from stage1.quantizers.vq import VectorQuantizer

VARIANTS = {
    "l2_ema": dict(),
    "cosine_gradient": dict(distance="cosine", codebook="gradient"),
    "lowdim_cosine": dict(codebook_dim=4, distance="cosine", codebook="gradient"),
    "rotation_gradient": dict(rotation_trick=True, codebook="gradient"),
    "l2_ema_restart_kmeans": dict(restart_dead=True, kmeans_init=True, kmeans_iters=3),
}


def _make(name: str, dim: int = 8, k: int = 16) -> VectorQuantizer:
    torch.manual_seed(0)
    return VectorQuantizer(dim=dim, codebook_size=k, **VARIANTS[name])


def _blobs(n: int, dim: int, centres: int, spread: float = 0.05, seed: int = 1) -> torch.Tensor:
    """``n`` rows around ``centres`` well separated cluster centres (scale ~3)."""
    g = torch.Generator().manual_seed(seed)
    mu = 3.0 * torch.randn(centres, dim, generator=g)
    lab = torch.randint(0, centres, (n,), generator=g)
    return mu[lab] + spread * torch.randn(n, dim, generator=g)


def _latent(rows: torch.Tensor, batch: int) -> torch.Tensor:
    """Rows ``(N, C)`` -> channel-first 1-D latent ``(batch, C, N // batch)``."""
    return rows.reshape(batch, -1, rows.shape[1]).movedim(-1, 1)


@pytest.mark.parametrize("distance", ["l2", "cosine"])
@pytest.mark.parametrize("chunk", [None, 7])
def test_codes_equal_brute_force_nearest(distance: str, chunk: int | None) -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(dim=6, codebook_size=37, distance=distance, chunk_size=chunk).eval()
    z = torch.randn(3, 6, 5, 4)
    rows, _ = to_rows(z)
    codes = q.codebook
    if distance == "cosine":
        rows = F.normalize(rows, dim=1)
    expected = torch.cdist(rows, codes).argmin(1)
    assert torch.equal(q.encode(z).reshape(-1), expected)
    assert torch.equal(q(z).codes.reshape(-1), expected)


def test_chunked_and_unchunked_distances_agree() -> None:
    torch.manual_seed(0)
    rows, codes = torch.randn(300, 16), torch.randn(300, 16)
    whole = nearest_code(rows, codes, chunk_rows=300)
    for chunk in (1, 13, 128, 299):
        assert torch.equal(nearest_code(rows, codes, chunk_rows=chunk), whole)
    cos_rows, cos_codes = F.normalize(rows, dim=1), F.normalize(codes, dim=1)
    assert torch.equal(
        nearest_code(cos_rows, cos_codes, cosine=True, chunk_rows=17),
        nearest_code(cos_rows, cos_codes, cosine=True, chunk_rows=300),
    )


def test_straight_through_gradient_is_identity_to_input() -> None:
    q = _make("l2_ema").train()
    z = torch.randn(2, 8, 5, requires_grad=True)
    out = q(z)
    out.z_q.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))
    z.grad = None
    q(z).loss.backward()  # commitment alone also pulls the encoder toward its code
    assert z.grad.abs().sum() > 0


def test_ema_moves_used_codes_toward_their_vectors() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(dim=4, codebook_size=8, decay=0.8).train()
    z = torch.randn(2, 4, 64)
    rows, _ = to_rows(z)
    idx = q.encode(z).reshape(-1)
    used = idx.unique()
    means = torch.stack([rows[idx == c].mean(0) for c in used])
    before = (q.codebook[used] - means).norm(dim=1)
    for _ in range(5):
        # The assignment may change as codes move; the first assignment's means still attract them.
        q(z)
    after = (q.codebook[used] - means).norm(dim=1)
    assert (after < before).float().mean() >= 0.75
    assert after.mean() < 0.5 * before.mean()


def test_gradient_codebook_has_codebook_loss_and_ema_has_none() -> None:
    grad_q = VectorQuantizer(dim=4, codebook_size=8, codebook="gradient")
    ema_q = VectorQuantizer(dim=4, codebook_size=8)
    assert any(p is grad_q.embed for p in grad_q.parameters())
    assert list(ema_q.parameters()) == []
    grad_q(torch.randn(2, 4, 6)).loss.backward()
    assert grad_q.embed.grad.abs().sum() > 0


def test_dead_code_restart_revives_unused_codes() -> None:
    data = _latent(_blobs(512, 8, centres=32), 1)
    usage = {}
    for restart in (False, True):
        torch.manual_seed(0)
        q = VectorQuantizer(dim=8, codebook_size=32, restart_dead=restart, dead_threshold=2.0)
        q.embed.add_(50.0)  # the whole codebook far off the data: one code wins everything
        q.embed_avg.copy_(q.embed)
        for _ in range(10):
            q(data)
        usage[restart] = q.eval()(data).stats["usage"].item()
    assert usage[False] <= 2 / 32
    assert usage[True] >= 0.6


def test_kmeans_init_spreads_codes_over_data() -> None:
    data = _latent(_blobs(1024, 8, centres=32) + 4.0, 2)  # off-centre: random codes sit apart
    usage = {}
    for init in (False, True):
        torch.manual_seed(0)
        q = VectorQuantizer(dim=8, codebook_size=32, kmeans_init=init, kmeans_iters=5, codebook="gradient")
        q.train()(data)  # first training batch triggers k-means; gradient codebook is not moved by forward
        usage[init] = q.eval()(data).stats["usage"].item()
    assert usage[True] >= 0.75
    assert usage[True] >= 2 * usage[False]
    assert bool(q.initialized)


def test_rotation_trick_same_forward_rotated_gradient() -> None:
    torch.manual_seed(0)
    plain = VectorQuantizer(dim=8, codebook_size=16)
    rot = VectorQuantizer(dim=8, codebook_size=16, rotation_trick=True)
    rot.load_state_dict(plain.state_dict())
    z = torch.randn(1, 8, 3, requires_grad=True)
    g = torch.randn(1, 8, 3)
    out_plain, out_rot = plain(z), rot(z)
    assert torch.equal(out_plain.codes, out_rot.codes)
    torch.testing.assert_close(out_rot.z_q, out_plain.z_q)
    (grad_z,) = torch.autograd.grad((out_rot.z_q * g).sum(), z)
    # Reference: explicit lambda * R^T g with the D x D Householder-based rotation for each row.
    e, q = to_rows(z.detach())[0], to_rows(out_rot.z_q.detach())[0]
    gr = to_rows(g)[0]
    for i in range(e.shape[0]):
        eh, qh = e[i] / e[i].norm(), q[i] / q[i].norm()
        r = (eh + qh) / (eh + qh).norm()
        rot_m = torch.eye(8) - 2 * torch.outer(r, r) + 2 * torch.outer(qh, eh)
        torch.testing.assert_close(rot_m @ eh, qh)
        expected = (q[i].norm() / e[i].norm()) * rot_m.T @ gr[i]
        torch.testing.assert_close(to_rows(grad_z)[0][i], expected)
    assert not torch.allclose(grad_z, g)  # it is not straight-through


def test_low_dim_cosine_lookup() -> None:
    q = _make("lowdim_cosine")
    assert q.codebook.shape == (16, 4)
    torch.testing.assert_close(q.codebook.norm(dim=1), torch.ones(16))
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    out = q(z)
    low = F.normalize(q.proj_in(to_rows(z.detach())[0]), dim=1)
    assert torch.equal(out.codes.reshape(-1), torch.cdist(low, q.codebook).argmin(1))
    assert out.z_q.shape == z.shape
    (out.z_q.sum() + out.loss).backward()
    assert z.grad.abs().sum() > 0 and q.proj_in.weight.grad.abs().sum() > 0 and q.embed.grad.abs().sum() > 0


def test_entropy_penalty_spreads_soft_assignment() -> None:
    torch.manual_seed(0)
    q = VectorQuantizer(dim=4, codebook_size=8, codebook="gradient", entropy_weight=1.0)
    out = q(torch.randn(2, 4, 16))
    assert {"entropy_per_sample", "entropy_batch"} <= set(out.stats)
    assert 0 <= out.stats["entropy_batch"] <= torch.log(torch.tensor(8.0)) + 1e-5
    out.loss.backward()
    assert q.embed.grad.abs().sum() > 0


# ------------------------------------------------------------------ contract, per variant
@pytest.mark.parametrize("name", list(VARIANTS))
@pytest.mark.parametrize("grid", [(7,), (3, 4), (2, 2, 3)])
def test_round_trip_shapes_and_gradient(name: str, grid: tuple[int, ...]) -> None:
    q = _make(name)
    z = torch.randn(2, 8, *grid, requires_grad=True)
    out = q.train()(z)
    assert out.z_q.shape == z.shape and out.codes.shape == (2, *grid) and out.loss.dim() == 0
    assert {"perplexity", "usage"} <= set(out.stats)
    (out.z_q.square().sum() + out.loss).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    q.eval()
    with torch.no_grad():
        ev = q(z)
        assert torch.equal(q.encode(z), ev.codes)
        assert torch.equal(q.decode(q.encode(z)), ev.z_q)
    ev_grad = q(z)  # eval with grad enabled: same values
    assert torch.equal(ev_grad.z_q.detach(), ev.z_q)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_state_dict_round_trip(name: str) -> None:
    q = _make(name).train()
    z = torch.randn(2, 8, 4, 4)
    for _ in range(2):
        q(z)
    buf = io.BytesIO()
    torch.save(q.state_dict(), buf)
    buf.seek(0)
    fresh = VectorQuantizer(dim=8, codebook_size=16, **VARIANTS[name])
    fresh.load_state_dict(torch.load(buf, weights_only=True))
    q.eval(), fresh.eval()
    assert torch.equal(fresh.encode(z), q.encode(z))
    assert torch.equal(fresh.decode(fresh.encode(z)), q.decode(q.encode(z)))
    assert bool(fresh.initialized)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_training_reduces_quantization_error(name: str) -> None:
    q = _make(name, k=16)
    data = _latent(_blobs(256, 8, centres=12, spread=0.2), 2)
    params = list(q.parameters())
    opt = torch.optim.Adam(params, lr=0.05) if params else None

    def error() -> float:
        # Quantization error in the lookup space (after projection / normalisation): what VQ minimises.
        with torch.no_grad():
            return q.eval()(data).stats["commit_loss"].item()

    if q.kmeans_init:  # k-means already happens on the first step; measure from a random codebook
        q.initialized.fill_(True)
    start = error()
    q.train()
    for _ in range(20):
        out = q(data)
        if opt is not None:
            opt.zero_grad()
            out.loss.backward()
            opt.step()
    assert error() < 0.7 * start


@pytest.mark.parametrize("name", list(VARIANTS))
def test_bf16_autocast(name: str) -> None:
    q = _make(name).train()
    z = torch.randn(2, 8, 3, 3)
    q(z)  # k-means (if any) on an fp32 batch first; the EMA update lands after each lookup
    ref_codes = q.eval().encode(z)
    q.train()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = q(z.bfloat16())
    assert out.z_q.dtype == torch.bfloat16 and torch.isfinite(out.loss) and out.loss.dtype == torch.float32
    # Distances stay fp32, so only bf16 rounding of the input itself can change a code.
    assert (out.codes == ref_codes).float().mean() >= 0.8


def test_codebook_loss_gradient_matches_gather_mse() -> None:
    torch.manual_seed(0)
    codes = torch.randn(10, 4, requires_grad=True)
    rows, idx = torch.randn(50, 4), torch.randint(0, 10, (50,))
    ref = F.mse_loss(codes[idx], rows)
    (ref_grad,) = torch.autograd.grad(ref, codes)
    fused = codebook_loss(codes, rows, idx, torch.bincount(idx, minlength=10), ref.detach())
    (grad,) = torch.autograd.grad(3.0 * fused, codes)
    torch.testing.assert_close(fused, ref.detach())
    torch.testing.assert_close(grad, 3.0 * ref_grad)
