"""CVQ-VAE online clustered codebook (Zheng & Vedaldi 2023, "Online Clustered Codebook").

A gradient-learnt VQ codebook plus, at every training step, a running-average usage
``p_k <- gamma p_k + (1 - gamma) n_k / N`` (paper: ``gamma = 0.99``) and a re-initialisation of every
code toward an anchor drawn from the current batch's encoder features:

``e_k <- (1 - a_k) e_k + a_k anchor_k``,  ``a_k = exp(-p_k K 10 / (1 - gamma) - 1e-3)``,

so a code in regular use (``p_k ~ 1/K``) barely moves (``a_k ~ e^-1000``) while a dead one jumps onto a
feature. Anchors: ``"closest"`` (for each code the batch feature nearest to it, found in chunks) or
``"random"`` (uniformly sampled batch features). The optional contrastive term
(``contrastive_weight``) treats, per code, the mean similarity of its ``N/K`` closest features as the
positive and the farthest half of the batch as negatives (InfoNCE, temperature 0.07); it needs the
full ``N x K`` similarity matrix and so is off by default.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from stage1.quantizers._vq_ops import all_reduce_sum_, broadcast_, default_chunk_rows
from stage1.quantizers.vq import VectorQuantizer


@torch.no_grad()
def closest_row_per_code(rows: Tensor, codes: Tensor, *, cosine: bool, chunk_rows: int | None = None) -> Tensor:
    """For every code, the index of the nearest row (column-wise argmin of the distances), in chunks.

    Unlike the row-wise search, ``||z||^2`` matters here (it varies along the reduced axis).
    """
    n, k = rows.shape[0], codes.shape[0]
    chunk = chunk_rows or default_chunk_rows(k)
    best = torch.full((k,), float("-inf"), device=rows.device)
    best_idx = torch.zeros(k, dtype=torch.long, device=rows.device)
    code_sq = None if cosine else codes.pow(2).sum(1)
    for start in range(0, n, chunk):
        part = rows[start : start + chunk]
        score = part @ codes.t()  # similarity; for l2: -(||z||^2 - 2 z.e + ||e||^2) up to ||e||^2
        if not cosine:
            score.mul_(2.0).sub_(part.pow(2).sum(1, keepdim=True)).sub_(code_sq)
        val, arg = score.max(dim=0)
        better = val > best
        best = torch.where(better, val, best)
        best_idx = torch.where(better, arg + start, best_idx)
    return best_idx


class ClusteredVQ(VectorQuantizer):
    """CVQ-VAE quantizer: gradient codebook with online clustered re-initialisation of unused codes."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        distance: str = "l2",
        beta: float = 0.25,
        decay: float = 0.99,
        anchor: str = "closest",
        contrastive_weight: float = 0.0,
        contrastive_temperature: float = 0.07,
        chunk_size: int | None = None,
    ) -> None:
        if anchor not in ("closest", "random"):
            raise ValueError(f"anchor must be 'closest' or 'random', got {anchor!r}")
        super().__init__(
            dim,
            codebook_size,
            codebook_dim=codebook_dim,
            distance=distance,
            beta=beta,
            codebook="gradient",
            decay=decay,
            chunk_size=chunk_size,
        )
        self.anchor = anchor
        self.contrastive_weight = contrastive_weight
        self.contrastive_temperature = contrastive_temperature
        # Running average of each code's share of the batch (starts at 0: every code is "unused").
        self.register_buffer("embed_prob", torch.zeros(codebook_size))

    @torch.no_grad()
    def _update_stats(self, rows: Tensor, idx: Tensor, counts_long: Tensor) -> None:
        super()._update_stats(rows, idx, counts_long)
        counts = counts_long.float()
        total = torch.tensor(float(idx.numel()), device=rows.device)
        all_reduce_sum_(counts, total)
        self.embed_prob.lerp_(counts / total, 1.0 - self.decay)
        if self.anchor == "closest":
            codes = self._codes_fp32().detach()
            anchors = rows[closest_row_per_code(rows, codes, cosine=self.cosine, chunk_rows=self.chunk_size)]
        else:
            anchors = rows[torch.randint(0, rows.shape[0], (self.codebook_size,), device=rows.device)]
        broadcast_(anchors)  # codebook parameters must stay identical across DDP ranks
        alpha = torch.exp(-self.embed_prob * self.codebook_size * 10.0 / (1.0 - self.decay) - 1e-3)
        self.embed.data.lerp_(anchors, alpha.unsqueeze(1))

    def _extra_loss(self, rows: Tensor, codes: Tensor, idx: Tensor, stats: dict[str, Tensor]) -> Tensor:
        if self.contrastive_weight <= 0 or not self.training:
            return rows.new_zeros(())
        z = rows.detach()
        if self.cosine:
            sim = z @ codes.t()
        else:
            sim = 2.0 * z @ codes.t() - z.pow(2).sum(1, keepdim=True) - codes.pow(2).sum(1)
        n = sim.shape[0]
        n_pos = max(1, n // self.codebook_size)
        pos = sim.topk(n_pos, dim=0).values.mean(0, keepdim=True)  # (1, K)
        neg = sim.topk(max(1, n // 2), dim=0, largest=False).values  # (n/2, K)
        logits = torch.cat([pos, neg], dim=0).t() / self.contrastive_temperature  # (K, 1 + n/2)
        target = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        contrastive = F.cross_entropy(logits, target)
        stats["contrastive_loss"] = contrastive.detach()
        return self.contrastive_weight * contrastive
