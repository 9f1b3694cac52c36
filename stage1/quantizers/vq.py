"""Nearest-neighbour vector quantization (VQ-VAE) with the usual training recipes behind one class.

Variants, all chosen by plain keyword arguments (so a YAML ``params`` block can select them):

- ``distance``: ``"l2"`` or ``"cosine"`` (both the encoder rows and the codes l2-normalised, as in
  ViT-VQGAN / LlamaGen);
- ``codebook_dim``: low-dimensional lookup (``Linear(dim, codebook_dim)`` in, ``Linear(codebook_dim,
  dim)`` out); combine with ``distance="cosine"`` for the ViT-VQGAN recipe (project, l2-normalise,
  look up, project back);
- ``codebook``: ``"gradient"`` (codebook loss ``||sg(z) - e||^2``) or ``"ema"`` (codes are running
  means of their assigned rows, Laplace-smoothed cluster sizes, synced over DDP ranks);
- ``kmeans_init``: Lloyd's k-means on the first training batch;
- ``restart_dead``: codes whose running usage falls below ``dead_threshold`` are re-seeded from a
  ring buffer of recent encoder rows;
- ``rotation_trick``: the rotation-trick gradient estimator (Fifty et al. 2024) instead of
  straight-through;
- ``entropy_weight``: codebook entropy penalty on the soft assignment distribution;
- ``init``: ``"uniform"`` codes ``U(-1/K, 1/K)`` (taming-transformers / LlamaGen, the default) or
  ``"normal"`` ``N(0, 1)``. Codes far outside the encoder's initial output cloud leave only the few
  smallest codes reachable; the collapse benchmark measured the rotation trick at 0.5% usage with
  ``N(0, 1)`` codes and 52% with the uniform init (K=1024, 1000 steps).

Distances are computed in fp32 (also under autocast) in the matmul form over row chunks; see
:mod:`stage1.quantizers._vq_ops`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1.quantizers._vq_ops import (
    all_reduce_sum_,
    broadcast_,
    cluster_sums,
    codebook_loss,
    default_chunk_rows,
    kmeans,
    lookup_with_estimator,
    nearest_code,
    soft_entropy_terms,
)
from stage1.quantizers.base import Quantizer, QuantizerOutput, from_rows, to_rows, usage_stats


def initial_codes(codebook_size: int, dim: int, init: str) -> Tensor:
    """Initial codebook: ``U(-1/K, 1/K)`` (``"uniform"``) or ``N(0, 1)`` (``"normal"``), ``(K, dim)``."""
    if init == "uniform":
        return torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
    return torch.randn(codebook_size, dim)


class VectorQuantizer(Quantizer):
    """VQ-VAE quantizer: ``z (B, dim, *grid) -> nearest code``; codes ``(B, *grid)``.

    Loss: ``beta * ||z - sg(e)||^2`` (commitment), plus ``||sg(z) - e||^2`` with a gradient codebook,
    plus ``entropy_weight * (mean per-row entropy - entropy of the mean)`` when enabled. With
    ``codebook_dim`` set, distances and losses live in the projected space.
    """

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        codebook_dim: int | None = None,
        distance: str = "l2",
        beta: float = 0.25,
        codebook: str = "ema",
        decay: float = 0.99,
        eps: float = 1e-5,
        kmeans_init: bool = False,
        kmeans_iters: int = 10,
        restart_dead: bool = False,
        dead_threshold: float = 1.0,
        restart_buffer_size: int = 4096,
        rotation_trick: bool = False,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 1.0,
        init: str = "uniform",
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        if init not in ("uniform", "normal"):
            raise ValueError(f"init must be 'uniform' (U(-1/K, 1/K)) or 'normal' (N(0, 1)), got {init!r}")
        if distance not in ("l2", "cosine"):
            raise ValueError(f"distance must be 'l2' or 'cosine', got {distance!r}")
        if codebook not in ("ema", "gradient"):
            raise ValueError(f"codebook must be 'ema' or 'gradient', got {codebook!r}")
        self.dim = dim
        self.codebook_size = codebook_size
        self.lookup_dim = codebook_dim or dim
        self.cosine = distance == "cosine"
        self.beta = beta
        # Loss weights: commitment ||z - sg(e)||^2 and (gradient codebook) ||sg(z) - e||^2.
        self.commit_weight = beta
        self.codebook_weight = 1.0
        self.use_ema = codebook == "ema"
        self.decay = decay
        self.eps = eps
        self.kmeans_init = kmeans_init
        self.kmeans_iters = kmeans_iters
        self.restart_dead = restart_dead
        self.dead_threshold = dead_threshold
        self.rotation_trick = rotation_trick
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.chunk_size = chunk_size or default_chunk_rows(codebook_size)

        if codebook_dim is not None:
            self.proj_in: nn.Module = nn.Linear(dim, codebook_dim)
            self.proj_out: nn.Module = nn.Linear(codebook_dim, dim)
        else:
            self.proj_in = nn.Identity()
            self.proj_out = nn.Identity()

        codes = initial_codes(codebook_size, self.lookup_dim, init)
        if self.cosine:
            codes = F.normalize(codes, dim=1)
        if self.use_ema:
            # EMA codes are not trained by the optimiser: buffers, so they live in state_dict and
            # are broadcast by DDP but never appear in ``parameters()``.
            self.register_buffer("embed", codes)
            self.register_buffer("embed_avg", codes.clone())
        else:
            self.embed = nn.Parameter(codes)
        # Running usage (EMA of per-batch counts): the EMA cluster size, and the dead-code signal.
        self.register_buffer("cluster_size", torch.ones(codebook_size))
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        if restart_dead:
            # Recent encoder rows to re-seed dead codes from; not worth checkpointing.
            self.register_buffer("restart_pool", torch.zeros(restart_buffer_size, self.lookup_dim), persistent=False)
            self.register_buffer("restart_filled", torch.zeros((), dtype=torch.long), persistent=False)
            self.register_buffer("restart_pos", torch.zeros((), dtype=torch.long), persistent=False)

    # ----------------------------------------------------------------------------------------
    @property
    def codebook(self) -> Tensor:
        """The codes actually looked up, ``(K, codebook_dim or dim)`` fp32 (l2-normalised for cosine)."""
        return self._codes_fp32().detach()

    def _codes_fp32(self) -> Tensor:
        """The lookup codebook computed in fp32 even under autocast (it feeds the distances)."""
        with torch.autocast(self.embed.device.type, enabled=False):
            return self._lookup_codes().float()

    def _lookup_codes(self) -> Tensor:
        """Hook: the codebook as looked up (SimVQ / OptVQ put a linear layer here)."""
        codes = self.embed.float()
        return F.normalize(codes, dim=1) if self.cosine else codes

    def _rows_in(self, z: Tensor) -> tuple[Tensor, tuple[int, ...]]:
        """Channel-first latent -> fp32 rows in the lookup space (projected, normalised if cosine)."""
        rows, grid = to_rows(z)
        rows = self.proj_in(rows).float()
        if self.cosine:
            rows = F.normalize(rows, dim=1)
        return rows, grid

    def _nearest(self, rows: Tensor, codes: Tensor) -> Tensor:
        with torch.autocast(rows.device.type, enabled=False):
            return nearest_code(rows.detach(), codes.detach(), cosine=self.cosine, chunk_rows=self.chunk_size)

    def _rows_out(self, rows: Tensor, grid: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return from_rows(self.proj_out(rows).to(dtype), grid)

    # ----------------------------------------------------------------------------------------
    def forward(self, z: Tensor) -> QuantizerOutput:
        rows, grid = self._rows_in(z)
        if self.training and not bool(self.initialized):
            self._init_from_kmeans(rows.detach())
        codes_fp = self._codes_fp32()  # differentiable when the codebook learns by gradient
        with torch.autocast(rows.device.type, enabled=False):
            idx = self._assign(rows.detach(), codes_fp.detach())
            rotate = self.rotation_trick and rows.requires_grad
            q = lookup_with_estimator(rows, codes_fp, idx, rotate=rotate)
            commit = F.mse_loss(rows, q.detach())
            loss = self.commit_weight * commit
            counts = torch.bincount(idx, minlength=self.codebook_size)
            if not self.use_ema:
                # Same value as the commitment term; its gradient goes to the codes (and whatever
                # produces them: SimVQ's / OptVQ's linear layer, the cosine normalisation).
                loss = loss + self.codebook_weight * codebook_loss(codes_fp, rows, idx, counts, commit)
            stats = usage_stats(idx, self.codebook_size)
            if self.entropy_weight > 0 and self.training:
                per_sample, batch = soft_entropy_terms(self._soft_logits(rows, codes_fp))
                loss = loss + self.entropy_weight * (per_sample - batch)
                stats["entropy_per_sample"] = per_sample.detach()
                stats["entropy_batch"] = batch.detach()
            loss = loss + self._extra_loss(rows, codes_fp, idx, stats)
            if self.training:
                self._record_stats(rows.detach(), idx, counts)
        stats["commit_loss"] = commit.detach()
        return QuantizerOutput(self._rows_out(q, grid, z.dtype), idx.view(grid), loss, stats)

    # Hooks for the codebook-learning variants built on this class (CVQ, SimVQ, OptVQ).
    def _assign(self, rows: Tensor, codes: Tensor) -> Tensor:
        """Code index per row (both detached, fp32): nearest code."""
        return self._nearest(rows, codes)

    def _extra_loss(self, rows: Tensor, codes: Tensor, idx: Tensor, stats: dict[str, Tensor]) -> Tensor:
        """Method-specific loss term (zero here); may add entries to ``stats``."""
        return rows.new_zeros(())

    def encode(self, z: Tensor) -> Tensor:
        rows, grid = self._rows_in(z)
        return self._nearest(rows, self._codes_fp32()).view(grid)

    def decode(self, codes: Tensor) -> Tensor:
        grid = tuple(codes.shape)
        rows = self._codes_fp32().index_select(0, codes.reshape(-1).long())
        out = self.proj_out(rows)
        return from_rows(out, grid)

    # ----------------------------------------------------------------------------------------
    def _soft_logits(self, rows: Tensor, codes: Tensor) -> Tensor:
        """Negative distances over temperature (``||z||^2`` dropped: softmax ignores row constants).

        This materialises the full ``N x K`` logits (the entropy term needs their gradient); it only
        runs when ``entropy_weight > 0``.
        """
        if self.use_ema:
            # A copy: the EMA update rewrites ``embed`` in place before this graph's backward runs.
            codes = codes.detach().clone()
        if self.cosine:
            logits = rows @ codes.t()
        else:
            logits = torch.addmm(codes.pow(2).sum(1), rows, codes.t(), beta=-1.0, alpha=2.0)
        return logits / self.entropy_temperature

    @torch.no_grad()
    def _init_from_kmeans(self, rows: Tensor) -> None:
        centroids, counts = kmeans(rows, self.codebook_size, self.kmeans_iters, cosine=self.cosine,
                                   chunk_rows=self.chunk_size)
        broadcast_(centroids, counts)
        self.embed.data.copy_(centroids)
        size = counts.clamp_min(1.0)
        self.cluster_size.copy_(size)
        if self.use_ema:
            self.embed_avg.copy_(centroids * size.unsqueeze(1))
        self.initialized.fill_(True)

    @contextmanager
    def pooled_updates(self) -> Iterator[None]:
        """Within this block, training forwards only collect their statistics (rows, codes, counts);
        on leaving it, one :meth:`_update_stats` runs on the pooled statistics.

        A residual stack sharing this quantizer across its levels (RQ-VAE) wraps its levels in this, so
        the EMA codebook, the running usage and dead-code restart move once per training step with the
        counts and sums of every level, and every level looks codes up in the same codebook.
        """
        if getattr(self, "_pending_stats", None) is not None:
            raise RuntimeError("pooled_updates() blocks cannot be nested")
        self._pending_stats: list[tuple[Tensor, Tensor, Tensor]] | None = []
        try:
            yield
            pending = self._pending_stats
        finally:
            self._pending_stats = None
        if pending:
            rows = torch.cat([p[0] for p in pending])
            idx = torch.cat([p[1] for p in pending])
            counts = torch.stack([p[2] for p in pending]).sum(0)
            self._update_stats(rows, idx, counts)

    def _record_stats(self, rows: Tensor, idx: Tensor, counts_long: Tensor) -> None:
        """Update now, or hold the statistics for the enclosing :meth:`pooled_updates` block."""
        pending = getattr(self, "_pending_stats", None)
        if pending is not None:
            pending.append((rows, idx, counts_long))
        else:
            self._update_stats(rows, idx, counts_long)

    @torch.no_grad()
    def _update_stats(self, rows: Tensor, idx: Tensor, counts_long: Tensor) -> None:
        """Running usage, EMA codebook update (if EMA), and dead-code restart (if enabled).

        ``counts_long`` is ``bincount(idx, minlength=K)`` of this (local) batch.
        """
        counts = counts_long.to(rows.dtype)
        if self.use_ema:
            sums = cluster_sums(rows, idx, counts_long)
            all_reduce_sum_(counts, sums)
            self.embed_avg.lerp_(sums, 1.0 - self.decay)
        else:
            all_reduce_sum_(counts)
        self.cluster_size.lerp_(counts, 1.0 - self.decay)
        if self.use_ema:
            n = self.cluster_size.sum()
            # Laplace smoothing keeps rarely used codes from dividing by ~0.
            smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
            torch.div(self.embed_avg, smoothed.unsqueeze(1), out=self.embed)
        if self.restart_dead:
            self._push_pool(rows)
            self._restart_dead_codes()

    @torch.no_grad()
    def _push_pool(self, rows: Tensor) -> None:
        size = self.restart_pool.shape[0]
        take = min(rows.shape[0], size)
        pick = torch.randperm(rows.shape[0], device=rows.device)[:take]
        pos = int(self.restart_pos)
        slots = (torch.arange(take, device=rows.device) + pos) % size
        self.restart_pool.index_copy_(0, slots, rows.index_select(0, pick))
        self.restart_pos.fill_((pos + take) % size)
        self.restart_filled.fill_(min(int(self.restart_filled) + take, size))

    @torch.no_grad()
    def _restart_dead_codes(self) -> None:
        dead = (self.cluster_size < self.dead_threshold).nonzero().squeeze(1)
        if dead.numel() == 0:
            return
        filled = int(self.restart_filled)
        new = self.restart_pool[torch.randint(0, filled, (dead.numel(),), device=dead.device)]
        broadcast_(new)  # the dead set agrees across ranks (usage is all-reduced); the seeds must too
        # A revived code gets a grace period: usage 2x the threshold takes ~ln2/(1-decay) unused
        # steps to fall below it again.
        revived = 2.0 * self.dead_threshold
        self.embed.data.index_copy_(0, dead, new)
        self.cluster_size.index_fill_(0, dead, revived)
        if self.use_ema:
            self.embed_avg.index_copy_(0, dead, new * revived)
