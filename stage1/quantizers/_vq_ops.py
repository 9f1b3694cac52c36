"""Shared numerics for the codebook quantizers: chunked nearest-code search, k-means, the
straight-through / rotation-trick lookup, and DDP helpers.

Everything here works on rows ``(N, d)`` in fp32. The distance is always the matmul form
``||z||^2 - 2 z.E^T + ||E||^2``; ``||z||^2`` is constant per row, so the argmin only needs
``||E||^2 - 2 z.E^T`` (one ``addmm``), computed over row chunks so the ``N x K`` temporary stays
bounded, with the argmin taken per chunk. There is never a Python loop over codes and never an
``N x K`` one-hot.
"""

from __future__ import annotations

import threading

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor

# Rows per chunk are chosen so that one chunk's N_chunk x K fp32 distance block stays near this size
# (16M elements, 64 MiB). Measured on 2 cores: smaller blocks cost more than they save (at D=256,
# K=8192, 4M-element blocks ran the distance at 0.63 of a plain torch.mm, 16M-element blocks at
# 0.96), since every chunk is one more GEMM call and its threading overhead. The block is allocated
# once per call and reused by every chunk. Rows below ~128 start to hurt the GEMM.
DEFAULT_BLOCK_ELEMENTS = 1 << 24
MAX_BLOCK_ELEMENTS = 1 << 24
MIN_CHUNK_ROWS = 128


_workspace = threading.local()


def _score_block(rows: int, k: int, like: Tensor) -> Tensor:
    """A ``(rows, k)`` scratch block for distance chunks.

    On CPU the block is cached per thread and reused across calls: a fresh 64 MiB allocation is
    handed out by ``mmap`` and pays a page fault per 4 KiB page on first touch, which measured as a
    large share of a whole training step on a 2-core VM. Accelerator allocators already cache.
    """
    if like.device.type != "cpu":
        return torch.empty(rows, k, dtype=like.dtype, device=like.device)
    key = like.dtype
    cache: dict = _workspace.__dict__.setdefault("blocks", {})
    buf = cache.get(key)
    if buf is None or buf.numel() < rows * k:
        buf = torch.empty(rows * k, dtype=like.dtype)
        cache[key] = buf
    return buf[: rows * k].view(rows, k)


def default_chunk_rows(codebook_size: int, block_elements: int = DEFAULT_BLOCK_ELEMENTS) -> int:
    """Rows per distance chunk so that ``rows * codebook_size`` stays near ``block_elements``."""
    rows = max(block_elements // max(codebook_size, 1), MIN_CHUNK_ROWS)
    return max(min(rows, MAX_BLOCK_ELEMENTS // max(codebook_size, 1)), 1)


@torch.no_grad()
def nearest_code(
    rows: Tensor,
    codebook: Tensor,
    *,
    cosine: bool = False,
    code_sq: Tensor | None = None,
    chunk_rows: int | None = None,
) -> Tensor:
    """Index of the nearest code for every row.

    ``rows`` ``(N, d)`` and ``codebook`` ``(K, d)`` must be fp32. With ``cosine=True`` both are
    assumed l2-normalised and the nearest code is the largest dot product. ``code_sq`` (``||E||^2``,
    shape ``(K,)``) may be passed when the caller already has it.
    """
    if cosine:
        return best_score(rows, codebook, chunk_rows=chunk_rows)
    if code_sq is None:
        code_sq = codebook.pow(2).sum(1)
    # argmin ||E||^2 - 2 z.E^T  ==  argmax 2 z.E^T - ||E||^2
    return best_score(rows, codebook, bias=code_sq.neg(), alpha=2.0, chunk_rows=chunk_rows)


@torch.no_grad()
def best_score(
    rows: Tensor,
    weight: Tensor,
    *,
    bias: Tensor | None = None,
    alpha: float = 1.0,
    chunk_rows: int | None = None,
) -> Tensor:
    """``argmax_k (bias_k + alpha * rows . weight_k)`` for every row, over bounded row chunks.

    One ``addmm`` into a block reused by every chunk, then the argmax of that block: the ``N x K``
    score matrix never exists at once. Serves nearest-code search (``bias = -||E||^2``,
    ``alpha = 2``), cosine / dot-product lookup (no bias) and logit heads (``bias`` = layer bias).
    """
    n, k = rows.shape[0], weight.shape[0]
    chunk = chunk_rows or default_chunk_rows(k)
    weight_t = weight.t()  # (d, K) view: BLAS takes the transposed operand without a copy
    idx = torch.empty(n, dtype=torch.long, device=rows.device)
    block = _score_block(min(chunk, n), k, rows)
    for start in range(0, n, chunk):
        part = rows[start : start + chunk]
        scores = block[: part.shape[0]]
        if bias is None:
            torch.mm(part, weight_t, out=scores)
            if alpha != 1.0:
                scores.mul_(alpha)
        else:
            torch.addmm(bias, part, weight_t, alpha=alpha, out=scores)
        torch.argmax(scores, dim=1, out=idx[start : start + chunk])
    return idx


@torch.no_grad()
def kmeans(
    rows: Tensor, k: int, iters: int, *, cosine: bool = False, chunk_rows: int | None = None
) -> tuple[Tensor, Tensor]:
    """Lloyd's k-means on ``rows`` (fp32), seeded by ``k`` random rows; returns centroids and counts.

    Assignment reuses :func:`nearest_code`; the update is a ``bincount`` plus ``index_add_``. A
    cluster that loses all its members keeps its previous centroid.
    """
    n = rows.shape[0]
    if n >= k:
        seed = torch.randperm(n, device=rows.device)[:k]
    else:
        seed = torch.randint(0, n, (k,), device=rows.device)
    centroids = rows[seed].clone()
    if cosine:
        centroids = F.normalize(centroids, dim=1)
    counts = torch.zeros(k, dtype=rows.dtype, device=rows.device)
    for _ in range(max(iters, 1)):
        idx = nearest_code(rows, centroids, cosine=cosine, chunk_rows=chunk_rows)
        counts_long = torch.bincount(idx, minlength=k)
        counts = counts_long.to(rows.dtype)
        sums = cluster_sums(rows, idx, counts_long)
        filled = counts > 0
        new = sums / counts.clamp_min(1.0).unsqueeze(1)
        if cosine:
            new = F.normalize(new, dim=1)
        centroids = torch.where(filled.unsqueeze(1), new, centroids)
    return centroids, counts


@torch.no_grad()
def cluster_sums(rows: Tensor, idx: Tensor, counts: Tensor) -> Tensor:
    """Per-code sums of the rows assigned to it, ``(K, d)``; ``counts`` is ``bincount(idx, minlength=K)``.

    On accelerators this is ``index_add_``. On CPU, ``index_add_`` / ``scatter_add_`` measured ~300 ms
    for 16k x 64 rows on 2 cores (a serial per-row path), while sorting the indices once and summing
    contiguous bags with ``embedding_bag`` takes ~25 ms for the same result.
    """
    k = counts.shape[0]
    if rows.device.type != "cpu":
        return torch.zeros(k, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, idx, rows)
    order = torch.argsort(idx)
    offsets = counts.cumsum(0) - counts
    return F.embedding_bag(order, rows, offsets.long(), mode="sum")


class _CodebookLoss(torch.autograd.Function):
    """``mean((codes[idx] - sg(rows))^2)`` whose value the caller already has (it equals the
    commitment value); the backward is ``2/(N d) (counts_k e_k - sum_{i in k} z_i)`` built from cluster
    sums, instead of a gather's backward, which on CPU is the slow serial ``index_add_``.
    """

    @staticmethod
    def forward(ctx, codes: Tensor, rows: Tensor, idx: Tensor, counts: Tensor, value: Tensor) -> Tensor:  # noqa: D102
        ctx.save_for_backward(codes, rows, idx, counts)
        return value.detach().clone()

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        codes, rows, idx, counts = ctx.saved_tensors
        sums = cluster_sums(rows, idx, counts)
        scale = grad * (2.0 / rows.numel())
        return (counts.to(codes.dtype).unsqueeze(1) * codes - sums) * scale, None, None, None, None


def codebook_loss(codes: Tensor, rows: Tensor, idx: Tensor, counts: Tensor, value: Tensor) -> Tensor:
    """Gradient-codebook loss ``||sg(z) - e||^2`` (mean); ``value`` is its (known) forward value."""
    return _CodebookLoss.apply(codes, rows.detach(), idx, counts, value)


class _CodeLookup(torch.autograd.Function):
    """``codebook[idx]`` in the forward; the backward hands the gradient to the encoder rows.

    Plain mode is the straight-through estimator ``z + (q - z).detach()`` without its two extra
    elementwise passes (and with a forward value exactly equal to the code). Rotation mode is the
    rotation trick (Fifty et al. 2024): the output is treated as ``sg(lambda R) e`` with ``R`` the
    rotation taking ``e_hat`` to ``q_hat`` (``R = I - 2 r r^T + 2 q_hat e_hat^T``,
    ``r = (e_hat + q_hat)/|e_hat + q_hat|``) and ``lambda = |q|/|e|``; its gradient is
    ``lambda R^T g = lambda (g - 2 r (r.g) + 2 e_hat (q_hat.g))``, computed per row, never as a
    ``d x d`` matrix.
    """

    @staticmethod
    def forward(ctx, rows: Tensor, codebook: Tensor, idx: Tensor, rotate: bool) -> Tensor:  # noqa: D102
        q = codebook.index_select(0, idx)
        ctx.rotate = rotate
        if rotate:
            ctx.save_for_backward(rows, q)
        return q

    @staticmethod
    def backward(ctx, grad: Tensor):  # noqa: D102
        if not ctx.rotate:
            return grad, None, None, None
        rows, q = ctx.saved_tensors
        # Expanded per row with a = e_hat.g, b = q_hat.g, c = e_hat.q_hat, s = (a + b) / (1 + c):
        #   lambda R^T g = lambda g + lambda (2b - s) e_hat - lambda s q_hat,
        # so only five row dot products and one fused output pass, all through one scratch buffer.
        eps = 1e-12
        buf = torch.empty_like(grad)

        def rowdot(x: Tensor, y: Tensor) -> Tensor:
            return torch.mul(x, y, out=buf).sum(1, keepdim=True)

        e_norm = rowdot(rows, rows).sqrt_().clamp_min_(eps)
        q_norm = rowdot(q, q).sqrt_().clamp_min_(eps)
        a = rowdot(rows, grad) / e_norm
        b = rowdot(q, grad) / q_norm
        c = rowdot(rows, q) / (e_norm * q_norm)
        s = (a + b) / (1.0 + c).clamp_min_(eps)
        lam = q_norm / e_norm
        out = torch.mul(grad, lam, out=buf)
        out.addcmul_(rows, lam * (2.0 * b - s) / e_norm)
        out.addcmul_(q, -lam * s / q_norm)
        return out, None, None, None


def lookup_with_estimator(rows: Tensor, codebook: Tensor, idx: Tensor, *, rotate: bool = False) -> Tensor:
    """``codebook[idx]`` whose gradient flows to ``rows`` by straight-through or the rotation trick.

    ``codebook`` gets no gradient from this path (codebook learning goes through its own loss or EMA).
    """
    return _CodeLookup.apply(rows, codebook.detach(), idx, rotate)


def ddp_active() -> bool:
    """True when a multi-process ``torch.distributed`` group is up (EMA stats must then be summed)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_sum_(*tensors: Tensor) -> None:
    """Sum tensors over DDP ranks in place (no-op on a single process)."""
    if ddp_active():
        for t in tensors:
            dist.all_reduce(t, op=dist.ReduceOp.SUM)


def broadcast_(*tensors: Tensor, src: int = 0) -> None:
    """Make every rank hold rank ``src``'s values (no-op on a single process)."""
    if ddp_active():
        for t in tensors:
            dist.broadcast(t, src=src)


def soft_entropy_terms(logits: Tensor) -> tuple[Tensor, Tensor]:
    """Mean per-row entropy and entropy of the batch-averaged distribution of ``softmax(logits)``."""
    log_p = torch.log_softmax(logits, dim=1)
    p = log_p.exp()
    per_sample = -(p * log_p).sum(1).mean()
    avg = p.mean(0)
    batch = -(avg * torch.log(avg.clamp_min(1e-12))).sum()
    return per_sample, batch
