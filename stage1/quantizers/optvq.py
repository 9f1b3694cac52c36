"""OptVQ (Zhang et al. 2024, "Preventing Local Pitfalls in Vector Quantization via Optimal Transport").

During training, rows are assigned to codes by entropic optimal transport instead of nearest
neighbour: Sinkhorn-Knopp with uniform marginals (each row carries mass 1/N, each code receives
1/K), on the pairwise L2 distances standardised over the batch (``(D - mean) / std``), so the
temperature is scale-free. The transport plan's argmax per row is the code; because every code must
receive its share of mass, codes that nearest neighbour would never pick get rows and therefore
gradients, which is what keeps OptVQ out of the local pitfalls of plain VQ. At inference the code is
the nearest one (chunked search). As in the paper's code, the codebook is passed through a learnable
linear projection (``code_proj``) and the loss is ``||z - sg(q)||^2 + beta ||sg(z) - q||^2``.

Sinkhorn is run in the log domain with potentials, so small temperatures cannot underflow; it needs
the full ``N x K`` cost matrix (no chunking possible: every iteration couples all rows and codes).
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import Tensor, nn

from stage1.quantizers._vq_ops import ddp_active
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
    """VQ whose training-time assignment is a Sinkhorn-Knopp optimal transport plan."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        beta: float = 1.0,
        sinkhorn_epsilon: float = 0.1,
        sinkhorn_iters: int = 5,
        code_proj: bool = True,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(
            dim,
            codebook_size,
            codebook_dim=codebook_dim,
            beta=beta,
            codebook="gradient",
            init="normal",  # the transport plan's cost is standardised, so the code scale does not matter
            chunk_size=chunk_size,
        )
        # The paper's weighting: commitment at 1, codebook term at beta.
        self.commit_weight = 1.0
        self.codebook_weight = beta
        self.sinkhorn_epsilon = sinkhorn_epsilon
        self.sinkhorn_iters = sinkhorn_iters
        d = self.lookup_dim
        self.code_proj = nn.Linear(d, d) if code_proj else None
        if self.code_proj is not None:
            nn.init.normal_(self.code_proj.weight, std=d**-0.5)
            nn.init.zeros_(self.code_proj.bias)

    def _lookup_codes(self) -> Tensor:
        codes = self.embed.float()
        return self.code_proj(codes) if self.code_proj is not None else codes

    def _assign(self, rows: Tensor, codes: Tensor) -> Tensor:
        if not self.training:
            return self._nearest(rows, codes)
        sq = rows.pow(2).sum(1, keepdim=True) + codes.pow(2).sum(1) - 2.0 * rows @ codes.t()
        cost = sq.clamp_min_(0.0).sqrt_()
        cost = (cost - cost.mean()) / (cost.std() + 1e-6)
        return sinkhorn_assign(cost, epsilon=self.sinkhorn_epsilon, iters=self.sinkhorn_iters)
