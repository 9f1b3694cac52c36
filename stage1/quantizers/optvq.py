"""OptVQ (Zhang et al. 2024, "Preventing Local Pitfalls in Vector Quantization via Optimal Transport").

During training, rows are assigned to codes by entropic optimal transport instead of nearest
neighbour: Sinkhorn-Knopp with uniform marginals (each row carries mass 1/N, each code receives
1/K), on the pairwise L2 distances standardised over the batch (``(D - mean) / std``), so the
temperature is scale-free. The transport plan's argmax per row is the code; because every code must
receive its share of mass, codes that nearest neighbour would never pick get rows and therefore
gradients, which is what keeps OptVQ out of the local pitfalls of plain VQ. At inference the code is
the nearest one (chunked search).

As in the paper's official code (``VectorQuantizerSinkhorn``):

- **multi-head codebook** (``num_heads``): each ``dim``-channel vector is split into ``num_heads``
  sub-vectors of ``dim / num_heads`` channels, all quantized with the *one* shared codebook of
  ``codebook_size`` codes of that width (one transport problem over all sub-vectors of the batch).
  Codes are then ``(B, *grid, num_heads)`` (``depth = num_heads``, like a grouped quantizer's groups);
  ``num_heads=1`` gives plain ``(B, *grid)`` codes. The paper's ImageNet models use 4 and 8 heads.
- the codebook passes through a learnable linear layer (``code_proj``, weight ``N(0, 1/d)``, default
  bias), codes start ``N(0, 1)``;
- **k-means initialisation** (``kmeans_init``, on by default): Lloyd's k-means on the (per-head)
  encoder rows of the first training batches (collected until there are at least ``codebook_size``
  rows; training runs on the random codes until then); the centroids become the looked-up codes (stored
  as the codes, with ``code_proj`` restarted at the identity). The official
  pipeline runs k-means over encoder features of a pass over the data before training; the first
  batches are this library's place for it (as for :class:`~stage1.quantizers.vq.VectorQuantizer`);
- loss ``||z - sg(q)||^2 + beta ||sg(z) - q||^2`` with ``beta = 0.25`` (the official configs).

Sinkhorn is run in the log domain with potentials, so small temperatures cannot underflow; it needs
the full ``N x K`` cost matrix (no chunking possible: every iteration couples all rows and codes).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stage1.quantizers._vq_ops import ddp_active
from stage1.quantizers.base import from_rows, to_rows
from stage1.quantizers.vq import VectorQuantizer


def _logsumexp_rows_global(x: Tensor) -> Tensor:
    """``logsumexp`` over dim 0 (the rows), summed across DDP ranks when they hold different rows."""
    if not ddp_active():
        return torch.logsumexp(x, dim=0)
    peak = x.amax(dim=0)
    dist.all_reduce(peak, op=dist.ReduceOp.MAX)
    total = (x - peak).exp().sum(0)
    dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return peak + total.log()


@torch.no_grad()
def sinkhorn_assign(cost: Tensor, *, epsilon: float, iters: int) -> Tensor:
    """Argmax per row of the entropic OT plan for ``cost`` (N, K) with uniform marginals.

    Plan ``P_ij = exp(-C_ij / eps + u_i + v_j)``; alternately fit the code marginal (``v``) and the
    row marginal (``u``), ending on the rows so each row is a distribution. ``u_i`` is a per-row
    constant, so the argmax only needs ``-C/eps + v``.
    """
    n, k = cost.shape
    world = dist.get_world_size() if ddp_active() else 1
    log_kernel = cost / -epsilon
    log_row_mass = -math.log(n * world)
    log_code_mass = -math.log(k)
    u = torch.full((n, 1), log_row_mass, device=cost.device)
    v = torch.zeros(1, k, device=cost.device)
    for _ in range(max(iters, 1)):
        v = log_code_mass - _logsumexp_rows_global(log_kernel + u).unsqueeze(0)
        u = log_row_mass - torch.logsumexp(log_kernel + v, dim=1, keepdim=True)
    return (log_kernel + v).argmax(dim=1)


class OptVQ(VectorQuantizer):
    """VQ whose training-time assignment is a Sinkhorn-Knopp optimal transport plan (multi-head, k-means init)."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        num_heads: int = 1,
        beta: float = 0.25,
        sinkhorn_epsilon: float = 0.1,
        sinkhorn_iters: int = 5,
        code_proj: bool = True,
        kmeans_init: bool = True,
        kmeans_iters: int = 10,
        chunk_size: int | None = None,
    ) -> None:
        if num_heads < 1 or dim % num_heads != 0:
            raise ValueError(f"dim={dim} must split into num_heads={num_heads} equal heads")
        super().__init__(
            dim,
            codebook_size,
            beta=beta,
            codebook="gradient",
            init="normal",  # nn.Embedding's N(0, 1), as in the official code
            kmeans_init=kmeans_init,
            kmeans_iters=kmeans_iters,
            chunk_size=chunk_size,
        )
        self.num_heads = int(num_heads)
        self.depth = self.num_heads if self.num_heads > 1 else None
        # One codebook of head-width codes, shared by every head.
        self.lookup_dim = dim // self.num_heads
        self.embed = nn.Parameter(torch.randn(codebook_size, self.lookup_dim))
        # The paper's weighting: commitment at 1, codebook term at beta.
        self.commit_weight = 1.0
        self.codebook_weight = beta
        self._kmeans_rows: list[Tensor] = []  # encoder rows collected until k-means can run
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iters = sinkhorn_iters
        d = self.lookup_dim
        self.code_proj = nn.Linear(d, d) if code_proj else None
        if self.code_proj is not None:
            nn.init.normal_(self.code_proj.weight, std=d**-0.5)  # bias keeps nn.Linear's default init

    def _lookup_codes(self) -> Tensor:
        codes = self.embed.float()
        return self.code_proj(codes) if self.code_proj is not None else codes

    # Heads: (B, dim, *grid) -> rows (B*prod(grid)*heads, dim/heads); the code grid gains a heads axis.
    def _rows_in(self, z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        rows, grid = to_rows(z)
        if self.num_heads == 1:
            return rows.float(), grid
        return rows.float().reshape(-1, self.lookup_dim), (*grid, self.num_heads)

    def _rows_out(self, rows: Tensor, grid: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        if self.num_heads == 1:
            return from_rows(rows.to(dtype), grid)
        return from_rows(rows.reshape(-1, self.dim).to(dtype), grid[:-1])

    def decode(self, codes: Tensor) -> Tensor:
        rows = self._codes_fp32().index_select(0, codes.reshape(-1).long())
        return self._rows_out(rows, tuple(codes.shape), rows.dtype)

    @torch.no_grad()
    def _init_from_kmeans(self, rows: Tensor) -> None:
        # Collect rows over the first training batches until there are at least K of them: k-means
        # seeded from fewer rows would duplicate codes, and duplicate codes tie exactly in the
        # transport plan (same column, same potential), so all but one would never be assigned.
        self._kmeans_rows.append(rows.clone())
        if sum(r.shape[0] for r in self._kmeans_rows) < self.codebook_size:
            return
        rows = torch.cat(self._kmeans_rows)
        self._kmeans_rows = []
        super()._init_from_kmeans(rows)  # embed <- centroids, usage <- cluster sizes
        if self.code_proj is not None:
            # Looked-up codes = the centroids: the projection restarts as the identity. (Solving the
            # stored codes through the random projection instead gives codes of large norm whenever
            # W is ill-conditioned, and the first optimiser steps on W then scatter the codebook.)
            nn.init.eye_(self.code_proj.weight)
            nn.init.zeros_(self.code_proj.bias)

    def _assign(self, rows: Tensor, codes: Tensor) -> Tensor:
        if not self.training:
            return self._nearest(rows, codes)
        sq = rows.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2.0 * rows @ codes.t()
        cost = sq.clamp_min_(0.0).sqrt_()
        cost = (cost - cost.mean()) / (cost.std() + 1e-6)
        return sinkhorn_assign(cost, epsilon=self.sinkhorn_epsilon, iters=self.sinkhorn_iters)
