"""GPT-style autoregressive prior over code grids (VQGAN's transformer, LlamaGen-style conditioning).

The codes of a sample are flattened row-major over the grid (depth-minor for residual codes) into
``N`` tokens. Input position ``t`` holds the previous token (position 0 holds the start token: a
class embedding, with index ``num_classes`` as the null class for classifier-free guidance, or a
learned start vector for an unconditional prior) and predicts token ``t``; so position ``t`` of the
transformer is exactly grid cell ``t``, which is what rope2d's row/column rotation refers to.
Residual codes add a learned embedding of the depth level being predicted.

Guidance follows :mod:`stage2.sampling`: ``cond + scale * (cond - uncond)`` with both branches in one
batched forward; ``scale = 0`` skips the unconditional branch and is plain conditional sampling.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from layers.transformer import Transformer
from stage2.prior import Prior
from stage2.sampling import cfg_logits, sample_from_logits


class ARPrior(Prior):
    """Class-conditional (or unconditional) autoregressive transformer prior.

    Args:
        codes, code_spec, num_classes, tokenizer_path: see :func:`stage2.prior.resolve_code_spec`.
        dim, depth, heads, mlp_ratio, norm, mlp, positions, dropout, ffn, ffn_every: the
            :class:`layers.transformer.Transformer` (always causal); ``positions`` defaults to rope1d.
        cond_drop_prob: probability of replacing a training label by the null class (for CFG).
        lr, weight_decay, betas, warmup_steps, max_steps, min_lr_ratio: AdamW + warmup/cosine.
    """

    def __init__(
        self,
        codes: str | None = None,
        code_spec: Mapping[str, Any] | None = None,
        num_classes: int | None = None,
        tokenizer_path: str | None = None,
        dim: int = 256,
        depth: int = 8,
        heads: int = 8,
        mlp_ratio: float = 4.0,
        norm: str = "rmsnorm",
        mlp: str = "swiglu",
        positions: str = "rope1d",
        dropout: float = 0.0,
        ffn: Mapping[str, Any] | None = None,
        ffn_every: int = 1,
        cond_drop_prob: float = 0.1,
        lr: float = 3e-4,
        weight_decay: float = 0.05,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 500,
        max_steps: int | None = None,
        min_lr_ratio: float = 0.1,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.setup_codes(codes, code_spec, num_classes, tokenizer_path)
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.cond_drop_prob = cond_drop_prob
        grid = list(self.grid) + ([self.code_depth] if self.code_depth else [])
        self.transformer = Transformer(
            dim, depth, heads, causal=True, mlp_ratio=mlp_ratio, norm=norm, mlp=mlp, positions=positions,
            max_len=self.seq_len, grid=grid if positions == "rope2d" else None, dropout=dropout,
            ffn=self.hparams["ffn"], ffn_every=ffn_every,
        )
        self.tok_emb = nn.Embedding(self.codebook_size, dim)
        if self.num_classes is not None:
            self.cls_emb = nn.Embedding(self.num_classes + 1, dim)  # last row = null class
        else:
            self.start = nn.Parameter(torch.zeros(1, 1, dim))
        self.level_emb = nn.Embedding(self.code_depth, dim) if self.code_depth else None
        self.head = nn.Linear(dim, self.codebook_size, bias=False)
        self.apply(self._init_weights)
        if self.num_classes is None:
            nn.init.normal_(self.start, std=0.02)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)

    @property
    def null_class(self) -> int:
        return self.num_classes  # type: ignore[return-value]

    # --- embeddings ---------------------------------------------------------------------------
    def _start(self, batch: int, labels: Tensor | None) -> Tensor:
        """Start-token embeddings ``(B, 1, D)``: the class (null class when ``labels`` is None)."""
        if self.num_classes is None:
            return self.start.expand(batch, 1, -1)
        if labels is None:
            labels = torch.full((batch,), self.null_class, dtype=torch.long, device=self.device)
        return self.cls_emb(labels)[:, None]

    def _add_level(self, x: Tensor, offset: int) -> Tensor:
        """Add the embedding of the depth level predicted at positions ``offset ..`` (residual codes)."""
        if self.level_emb is None:
            return x
        levels = torch.arange(offset, offset + x.shape[1], device=x.device) % self.code_depth
        return x + self.level_emb(levels)

    def _inputs(self, flat: Tensor, labels: Tensor | None, batch: int) -> Tensor:
        """Input embeddings for positions ``0 .. flat.shape[1]``: start token then ``flat`` codes."""
        x = torch.cat([self._start(batch, labels), self.tok_emb(flat)], dim=1)
        return self._add_level(x, 0)

    def forward(self, codes: Tensor, labels: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced logits ``(B, N, V)`` for codes ``(B, *grid[, depth])``, and the aux dict."""
        flat = self.flatten_codes(codes)
        h, aux = self.transformer(self._inputs(flat[:, :-1], labels, flat.shape[0]))
        return self.head(h), aux

    # --- training -----------------------------------------------------------------------------
    def _nll(self, batch: Mapping[str, Tensor], drop_labels: bool) -> tuple[Tensor, dict[str, Tensor], int]:
        codes = batch["codes"]
        labels = self.batch_labels(batch)
        if labels is not None and drop_labels and self.cond_drop_prob > 0:
            drop = torch.rand(labels.shape, device=labels.device) < self.cond_drop_prob
            labels = torch.where(drop, torch.full_like(labels, self.null_class), labels)
        logits, aux = self(codes, labels)
        target = self.flatten_codes(codes)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        return nll, aux, codes.shape[0]

    def training_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> Tensor:
        nll, aux, b = self._nll(batch, drop_labels=True)
        loss = nll + aux["aux_loss"]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        self.log("train/nll", nll, batch_size=b)
        self.log_aux(aux, "train", b)
        return loss

    def validation_step(self, batch: Mapping[str, Tensor], batch_idx: int) -> None:
        nll, aux, b = self._nll(batch, drop_labels=False)
        self.log("val/loss", nll, prog_bar=True, batch_size=b, sync_dist=True)
        self.log("val/bits_per_token", nll / math.log(2), batch_size=b, sync_dist=True)
        self.log_aux(aux, "val", b)

    # --- sampling -----------------------------------------------------------------------------
    @torch.no_grad()
    def sample(
        self,
        n: int,
        cond: int | Sequence[int] | Tensor | None = None,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        cfg_scale: float = 0.0,
        use_cache: bool = True,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Sample ``n`` code grids ``(n, *grid[, depth])``.

        ``cond``: None (unconditional: the null class for a conditional prior), one class for all,
        or ``n`` classes. ``cfg_scale`` guides as ``cond + s * (cond - uncond)`` (needs ``cond``).
        ``use_cache=False`` recomputes the whole prefix at every step (the reference the KV cache is
        benchmarked against); both paths draw the same random numbers in the same order.
        """
        labels = self.cond_tensor(n, cond)
        guided = cfg_scale != 0 and labels is not None
        if guided:
            null = torch.full_like(labels, self.null_class)
            labels = torch.cat([labels, null])
        rows = labels.shape[0] if labels is not None else n
        was_training = self.training
        self.eval()
        try:
            tokens = torch.zeros(rows, self.seq_len, dtype=torch.long, device=self.device)
            start = self._start(rows, labels)
            cache = self.transformer.new_cache(rows, self.seq_len) if use_cache else None
            for t in range(self.seq_len):
                if cache is not None:
                    x = start if t == 0 else self.tok_emb(tokens[:, t - 1 : t])
                    x = self._add_level(x, t)  # step 0 too: training adds level 0 to the start token
                    h, _ = self.transformer(x, cache)
                else:
                    x = self._add_level(torch.cat([start, self.tok_emb(tokens[:, :t])], dim=1), 0)
                    h, _ = self.transformer(x)
                logits = self.head(h[:, -1]).float()
                if guided:
                    logits = cfg_logits(logits[:n], logits[n:], cfg_scale)
                nxt = sample_from_logits(logits, temperature, generator, top_k=top_k, top_p=top_p)
                tokens[:, t] = nxt.repeat(rows // n)
        finally:
            self.train(was_training)
        return self.unflatten_codes(tokens[:n])
