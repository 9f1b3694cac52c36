"""RQ-Transformer (Lee et al., CVPR 2022): the stage-two prior of RQ-VAE's stacked residual codes.

Codes ``(B, *grid, D)`` are read as ``T = prod(grid)`` positions of ``D`` levels each. Two causal
transformers split the work (paper Sec. 3.2, Eqs. 4-6):

* the **spatial transformer** runs over positions; its input at position ``t`` is the start token
  (class embedding, or a learned start vector) for ``t = 0`` and otherwise the sum of the ``D`` code
  embeddings of position ``t - 1`` (rotary/learned positions inside :class:`layers.transformer.Transformer`
  play the role of the paper's ``PE_T``). Its output ``h_t`` summarises everything before position ``t``.
* the **depth transformer** runs over the ``D`` levels of one position; its input at level 0 is ``h_t``
  and at level ``d > 0`` the embeddings of the levels already chosen: by default their cumulative sum
  ``sum_{j<d} e(c_{t,j})`` (paper Eq. 5; the official configs set ``cumsum_depth_ctx``), or only
  ``e(c_{t,d-1})`` with ``depth_input="previous"``; learned level positions are the paper's ``PE_D``.
  One shared head maps its outputs to the ``K`` codes of the (shared) codebook.

Sampling therefore costs ``T`` spatial steps plus ``T * D`` depth steps of a much smaller transformer,
instead of ``T * D`` steps of one large transformer for a flat AR prior; both transformers keep a KV
cache (the depth cache is reset at every position).

Exposure-bias remedies of the paper (Sec. 3.3), as options, need the tokenizer's codebook, which is
read from ``tokenizer_path`` at ``fit`` time (or set with :meth:`RQTransformer.set_codebook`):

* ``soft_label_temperature = tau``: the target of level ``d`` is ``Q_tau(k | r_d) ∝ exp(-||r_d - e_k||² / tau)``
  instead of the one-hot code, where ``r_d`` is the residual left after the levels before ``d``;
* ``stochastic_codes``: the training input codes are re-drawn level by level from ``Q_tau`` (the
  residual is updated with the drawn code), so the prior sees the small deviations it will produce.

The paper computes ``r_d`` from the encoder's continuous feature ``z``; code files hold only the codes,
so ``z`` is stood in for by its quantized value ``ẑ = sum_d e(c_d)`` (they differ by the last level's
quantization error). Validation NLL is always measured against the data's own hard codes.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.transformer import Transformer
from stage2.ar import init_gpt_weights
from stage2.options import TOKEN_SAMPLING, SamplingOption
from stage2.prior import Prior, PriorLoss
from stage2.sampling import cfg_logits, sample_from_logits

DEPTH_INPUTS = ("cumsum", "previous")


def residual_soft_codes(
    tables: Tensor,
    codes: Tensor,
    temperature: float,
    stochastic: bool = False,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Soft targets ``Q_tau(k | r_d)`` and (optionally re-drawn) codes for hard codes ``(N, D)``.

    ``tables`` ``(D, K, C)`` are the codebook vectors of each level (the same rows at every level for a
    shared codebook). The feature is ``ẑ = sum_d tables[d, codes[:, d]]``; level ``d``'s residual is
    ``r_d = ẑ - sum_{j<d} tables[j, c_j]`` with the codes ``c_j`` actually used (the data's, or the
    drawn ones when ``stochastic``). Returns ``(soft (N, D, K), codes (N, D))``.
    """
    if temperature <= 0:
        raise ValueError(f"the soft-label temperature must be > 0, got {temperature}")
    depth = codes.shape[-1]
    tables = tables.float()
    level_index = torch.arange(depth, device=codes.device)
    residual = tables[level_index, codes].sum(dim=1)  # ẑ: (N, C)
    soft, used = [], []
    for d in range(depth):
        book = tables[d]
        # squared L2 in the matmul form: ||r||² - 2 r·e + ||e||²
        dist = residual.pow(2).sum(-1, keepdim=True) - 2 * residual @ book.T + book.pow(2).sum(-1)[None]
        q = F.softmax(-dist / temperature, dim=-1)
        code = torch.multinomial(q, 1, generator=generator).squeeze(1) if stochastic else codes[:, d]
        residual = residual - book[code]
        soft.append(q)
        used.append(code)
    return torch.stack(soft, dim=1), torch.stack(used, dim=1)


def per_level(value: Any, depth: int, name: str) -> list[Any]:
    """A sampling option given once for all levels or as one value per level."""
    if value is None or isinstance(value, (int, float)):
        return [value] * depth
    values = list(value)
    if len(values) == 1:
        return values * depth
    if len(values) != depth:
        raise ValueError(f"{name} needs one value or {depth} (one per level), got {values}")
    return values


class RQTransformer(Prior):
    """Spatial + depth transformer prior over residual codes ``(B, *grid, D)``, class-conditional with CFG.

    Args:
        dim, heads, mlp_ratio, norm, mlp, dropout: shared by both transformers.
        spatial_layers, positions: the spatial transformer (causal over positions; ``positions`` as in
            :class:`layers.transformer.Transformer`, default rope1d).
        depth_layers: the depth transformer (causal over levels, learned level positions).
        depth_input: ``"cumsum"`` (paper) or ``"previous"``: what the depth transformer sees at level ``d > 0``.
        shared_embedding: one code embedding for all levels (RQ-VAE's shared codebook); ``False`` gives
            each level its own table (per-level codebooks, e.g. SoundStream-style RVQ).
        soft_label_temperature: ``tau`` of the soft targets (``None`` = one-hot targets).
        stochastic_codes: draw training input codes from ``Q_tau`` (needs ``soft_label_temperature``).
        **prior: the base arguments of :class:`stage2.prior.Prior` (codes, code_spec, num_classes,
            tokenizer, cond_drop_prob, lr, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio).
            Flat codes ``(B, *grid)`` are treated as ``D = 1``.
    """

    sampling_options = (*TOKEN_SAMPLING, SamplingOption(
        "use_cache", bool, True, "KV caches in both transformers (off: recompute each prefix, the reference)"))

    def __init__(
        self,
        dim: int = 256,
        spatial_layers: int = 6,
        depth_layers: int = 2,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        norm: str = "rmsnorm",
        mlp: str = "swiglu",
        positions: str = "rope1d",
        dropout: float = 0.0,
        depth_input: str = "cumsum",
        shared_embedding: bool = True,
        soft_label_temperature: float | None = None,
        stochastic_codes: bool = False,
        **prior: Any,
    ):
        super().__init__(**prior)
        if depth_input not in DEPTH_INPUTS:
            raise ValueError(f"depth_input must be one of {DEPTH_INPUTS}, got {depth_input!r}")
        if stochastic_codes and soft_label_temperature is None:
            raise ValueError("stochastic_codes draws codes from Q_tau: set soft_label_temperature too")
        if soft_label_temperature is not None and soft_label_temperature <= 0:
            raise ValueError(f"soft_label_temperature must be > 0, got {soft_label_temperature}")
        self.levels = self.code_depth or 1
        self.positions_per_sample = math.prod(self.grid)
        self.cumsum_depth = depth_input == "cumsum"
        self.soft_label_temperature = soft_label_temperature
        self.stochastic_codes = stochastic_codes
        self.spatial = Transformer(
            dim, spatial_layers, heads, causal=True, mlp_ratio=mlp_ratio, norm=norm, mlp=mlp,
            positions=positions, max_len=self.positions_per_sample,
            grid=list(self.grid) if positions == "rope2d" else None, dropout=dropout,
        )
        self.depth_transformer = Transformer(
            dim, depth_layers, heads, causal=True, mlp_ratio=mlp_ratio, norm=norm, mlp=mlp,
            positions="learned", max_len=self.levels, dropout=dropout,
        )
        self.tok_emb = nn.Embedding(self.codebook_size * (1 if shared_embedding else self.levels), dim)
        offsets = torch.zeros(self.levels, dtype=torch.long)
        if not shared_embedding:
            offsets = torch.arange(self.levels) * self.codebook_size
        self.register_buffer("level_offsets", offsets, persistent=False)
        self.classes = self.class_embedding(dim)  # the spatial start token; the null row when unconditional
        self.head = nn.Linear(dim, self.codebook_size, bias=False)
        self.apply(init_gpt_weights)
        # Codebook vectors (D, K, C) for soft labels / stochastic codes; training-time only.
        self.register_buffer("codebook_tables", torch.empty(0), persistent=False)

    # --- codebook for the exposure-bias options ----------------------------------------------------
    @property
    def needs_codebook(self) -> bool:
        return self.soft_label_temperature is not None

    def set_codebook(self, tables: Tensor) -> None:
        """Codebook vectors ``(K, C)`` (shared) or ``(D, K, C)`` (per level) for soft labels."""
        if tables.dim() == 2:
            tables = tables.unsqueeze(0).expand(self.levels, -1, -1)
        if tables.dim() != 3 or tables.shape[:2] != (self.levels, self.codebook_size):
            raise ValueError(f"codebook tables must be ({self.levels}, {self.codebook_size}, C), "
                             f"got {tuple(tables.shape)}")
        self.codebook_tables = tables.detach().float().contiguous().to(self.head.weight.device)

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.needs_codebook and self.codebook_tables.numel() == 0:
            self.set_codebook(tokenizer_codebook(self.tokenizer_path, self.levels, self.codebook_size))

    # --- network --------------------------------------------------------------------------------
    def embed(self, codes: Tensor, level: int | None = None) -> Tensor:
        """Embeddings of codes ``(..., d)`` (levels ``0..d-1``) or of codes ``(...)`` at one ``level``."""
        offsets = self.level_offsets[: codes.shape[-1]] if level is None else self.level_offsets[level]
        return self.tok_emb(codes + offsets)

    def positions_view(self, codes: Tensor) -> Tensor:
        """``(B, *grid[, D]) -> (B, T, D)`` long codes."""
        return self.flatten_codes(codes).view(codes.shape[0], self.positions_per_sample, self.levels)

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced logits ``(B, T, D, K)`` for codes ``(B, *grid[, D])``, and the aux dict."""
        c = self.positions_view(codes)
        b, t, depth = c.shape
        emb = self.embed(c)  # (B, T, D, dim)
        spatial_in = torch.cat([self.classes(labels, b)[:, None], emb[:, :-1].sum(dim=2)], dim=1)
        h, aux = self.spatial(spatial_in)  # h_t: context of positions < t
        chosen = emb[:, :, :-1]
        if self.cumsum_depth:
            chosen = chosen.cumsum(dim=2)
        depth_in = torch.cat([h[:, :, None], chosen], dim=2).reshape(b * t, depth, -1)
        g, depth_aux = self.depth_transformer(depth_in)
        aux["aux_loss"] = aux["aux_loss"] + depth_aux["aux_loss"]
        return self.head(g).view(b, t, depth, -1), aux

    # --- training -----------------------------------------------------------------------------
    def soft_targets(self, codes: Tensor, generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """``(soft (B, T, D, K), input codes shaped like codes)`` under the exposure-bias options."""
        if self.codebook_tables.numel() == 0:
            raise RuntimeError("soft labels need the tokenizer's codebook: call set_codebook() or train with "
                               "a tokenizer_path (read at fit time)")
        c = self.positions_view(codes)
        soft, used = residual_soft_codes(self.codebook_tables, c.reshape(-1, self.levels),
                                         float(self.soft_label_temperature), self.stochastic_codes, generator)
        return soft.view(*c.shape, -1), used.view(codes.shape)

    def loss(self, codes: Tensor, labels: Tensor | None, context: Tensor | None = None,
             generator: torch.Generator | None = None) -> PriorLoss:
        """Cross-entropy of every level of every position (the exact NLL of the codes, in nats per code).

        In training with ``soft_label_temperature`` the objective is the cross-entropy against
        ``Q_tau`` (inputs re-drawn from it with ``stochastic_codes``); validation always scores the hard codes.
        """
        soft = None
        if self.training and self.needs_codebook:
            soft, codes = self.soft_targets(codes, generator)
        logits, aux = self(codes, labels)
        flat_logits = logits.float().reshape(-1, self.codebook_size)
        target = self.positions_view(codes)
        nll = F.cross_entropy(flat_logits, target.reshape(-1), reduction="none").view(target.shape)
        # -sum_k Q(k) log p(k) with probability targets
        objective = nll.mean() if soft is None else F.cross_entropy(flat_logits, soft.reshape(-1, self.codebook_size))
        stats = {}
        if self.levels > 1:  # deeper levels carry finer detail and are harder to predict
            stats = {f"nll_level{d}": v.detach() for d, v in enumerate(nll.mean(dim=(0, 1)))}
        return PriorLoss(objective, nll.mean(), aux, stats)

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: int | Sequence[int] | Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | Sequence[int] | None = None,
        top_p: float | Sequence[float] | None = None,
        cfg_scale: float = 0.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
        context: Tensor | None = None,
    ) -> Tensor:
        """Sample ``n`` code grids ``(n, *grid[, D])``, position by position and level by level.

        ``top_k``/``top_p`` take one value for every level or one per level. ``cfg_scale`` guides each
        level's logits as ``cond + s * (cond - uncond)`` (needs ``cond``). ``use_cache=False`` recomputes
        both transformers over their whole prefix at every step (the reference for the KV caches); both
        paths draw the same random numbers in the same order.
        """
        top_ks = per_level(top_k, self.levels, "top_k")
        top_ps = per_level(top_p, self.levels, "top_p")
        labels, guided = self.guidance_labels(n, cond, cfg_scale)
        rows = labels.shape[0]
        with self.evaluating():
            codes = torch.zeros(rows, self.positions_per_sample, self.levels, dtype=torch.long, device=self.device)
            start = self.classes(labels)[:, None]
            spatial_cache = self.spatial.new_cache(rows) if use_cache else None
            depth_cache = self.depth_transformer.new_cache(rows) if use_cache else None
            spatial_in = start
            for t in range(self.positions_per_sample):
                if spatial_cache is not None:
                    h = self.spatial(spatial_in, spatial_cache)[0][:, -1:]
                    depth_cache.reset()
                else:
                    prefix = self.embed(codes[:, :t]).sum(dim=2)
                    h = self.spatial(torch.cat([start, prefix], dim=1))[0][:, -1:]
                depth_in, total = h, torch.zeros_like(h)
                for d in range(self.levels):
                    if depth_cache is not None:
                        g = self.depth_transformer(depth_in, depth_cache)[0][:, -1]
                    else:
                        chosen = self.embed(codes[:, t, :d])  # (rows, d, dim)
                        if self.cumsum_depth:
                            chosen = chosen.cumsum(dim=1)
                        g = self.depth_transformer(torch.cat([h, chosen], dim=1))[0][:, -1]
                    logits = self.head(g).float()
                    if guided:
                        logits = cfg_logits(logits[:n], logits[n:], cfg_scale)
                    nxt = sample_from_logits(logits, temperature, generator, top_k=top_ks[d], top_p=top_ps[d])
                    nxt = nxt.repeat(rows // n)
                    codes[:, t, d] = nxt
                    e = self.embed(nxt, level=d)[:, None]
                    total = total + e
                    depth_in = total if self.cumsum_depth else e
                spatial_in = total  # the next position sees the sum of this position's embeddings
        return self.unflatten_codes(codes[:n].reshape(n, -1))


def tokenizer_codebook(tokenizer_path: str | None, levels: int, codebook_size: int) -> Tensor:
    """The codebook vectors ``(D, K, C)`` of each level of the tokenizer at ``tokenizer_path``.

    Read through the quantizer contract: level ``d``'s single-level quantizer decodes the codes
    ``0..K-1`` (divided by the residual quantizer's level scale, 1 for VQ).
    """
    from stage1.tokenizer import load_tokenizer

    if not tokenizer_path:
        raise FileNotFoundError("soft labels / stochastic codes need the tokenizer's codebook, but this prior "
                                "records no tokenizer_path; set model.params.tokenizer_path")
    quantizer = load_tokenizer(tokenizer_path).quantizer
    ids = torch.arange(codebook_size)[None]  # a (1, K) "grid" of every code
    tables = []
    for d in range(levels):
        level = quantizer.level(d) if hasattr(quantizer, "level") else quantizer
        scale = float(getattr(quantizer, "level_scale", 1.0)) ** d
        tables.append(level.decode(ids).float()[0].T / scale)  # (C, K) -> (K, C)
    return torch.stack(tables)
