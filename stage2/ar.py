"""GPT-style autoregressive prior over code grids (VQGAN's transformer, LlamaGen-style conditioning).

The codes of a sample are flattened row-major over the grid (depth-minor for residual codes) into
``N`` tokens. Input position ``t`` holds the previous token (position 0 holds the start token: a
class embedding, with index ``num_classes`` as the null class for classifier-free guidance, or a
learned start vector for an unconditional prior) and predicts token ``t``; so position ``t`` of the
transformer is exactly grid cell ``t``, which is what rope2d's row/column rotation refers to.
Residual and grouped codes add a learned embedding of the depth level being predicted (the start
token included: it predicts level 0). Code and class embeddings, label dropout, the optimiser and
the training loop come from :class:`stage2.prior.Prior`.

Guidance follows :mod:`stage2.sampling`: ``cond + scale * (cond - uncond)`` with both branches in one
batched forward; ``scale = 0`` skips the unconditional branch and is plain conditional sampling.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage2.context import ContextGrid, context_inputs
from stage2.options import TOKEN_SAMPLING, SamplingOption
from stage2.prior import PriorLoss
from stage2.sampling import cfg_logits, sample_from_logits
from stage2.transformer_prior import TransformerPrior, init_gpt_weights  # noqa: F401 - re-exported


class ARPrior(TransformerPrior):
    """Class-conditional (or unconditional) autoregressive transformer prior.

    Args:
        **prior: the transformer's arguments (:class:`stage2.transformer_prior.TransformerPrior`: dim,
            depth, heads, ..., always causal, ``positions`` default rope1d) and the base arguments of
            :class:`stage2.prior.Prior` (codes, code_spec, num_classes, tokenizer, cond_drop_prob, lr, ...).
    """

    accepts_context = True  # context_level: a conditioning code grid added per cell (stage2.context)
    sampling_options = (*TOKEN_SAMPLING, SamplingOption(
        "use_cache", bool, True, "KV-cached decoding (off: recompute the prefix each step, the reference)"))

    def __init__(self, **prior: Any):
        super().__init__(**prior)
        dim = self.dim
        self.transformer = self.build_transformer(causal=True)  # position 0 (the start token) is cell 0
        self.embed = self.code_embedding(dim)
        self.classes = self.class_embedding(dim)  # the start token; the null row for unconditional
        self.head = nn.Linear(dim, self.codebook_size, bias=False)
        ctx = self.context_layout()
        self.context = ContextGrid(ctx, self.layout, dim) if ctx is not None else None
        self.apply(init_gpt_weights)

    def _inputs(self, flat: Tensor, labels: Tensor | None, batch: int) -> Tensor:
        """Input embeddings for positions ``0 .. flat.shape[1]``: start token then ``flat`` codes."""
        x = torch.cat([self.classes(labels, batch)[:, None], self.embed.tokens(flat)], dim=1)
        return self.embed.add_levels(x, 0)

    def forward(self, codes: Tensor, labels: Tensor | None = None,
                context: Tensor | None = None) -> tuple[Tensor, dict[str, Tensor]]:
        """Teacher-forced logits ``(B, N, V)`` for codes ``(B, *grid[, depth])``, and the aux dict.
        Input position ``t`` predicts cell ``t``, so it gets cell ``t``'s context."""
        flat = self.flatten_codes(codes)
        x = self._inputs(flat[:, :-1], labels, flat.shape[0])
        ctx = context_inputs(self.context, context, flat.shape[0])
        h, aux = self.transformer(x if ctx is None else x + ctx)
        return self.head(h), aux

    def loss(self, codes: Tensor, labels: Tensor | None, context: Tensor | None = None,
             generator: torch.Generator | None = None) -> PriorLoss:
        """Next-token cross-entropy over the whole sequence: the exact NLL of the codes."""
        logits, aux = self(codes, labels, context)
        target = self.flatten_codes(codes)
        nll = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1))
        return PriorLoss(nll, nll, aux)

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
        context: Tensor | None = None,
        prompt: Tensor | None = None,
    ) -> Tensor:
        """Sample ``n`` code grids ``(n, *grid[, depth])``.

        ``cond``: None (unconditional: the null class for a conditional prior), one class for all,
        or ``n`` classes. ``cfg_scale`` guides as ``cond + s * (cond - uncond)`` (needs ``cond``).
        ``use_cache=False`` recomputes the whole prefix at every step (the reference the KV cache is
        benchmarked against); both paths feed the same embeddings and draw the same random numbers.
        ``context``: the ``context_level`` codes ``(n, ...)`` of a prior conditioned on another grid.
        ``prompt``: continuation (prompted sampling, e.g. the codes of an audio clip's first second):
        codes ``(n, t, ...)`` of the first ``t`` rows of the grid, kept as given; sampling continues after them.
        """
        labels, guided = self.guidance_labels(n, cond, cfg_scale)
        rows = labels.shape[0]
        ctx = context_inputs(self.context, context, rows)
        fixed = 0
        if prompt is not None:  # the prompt's rows are a prefix of the row-major (depth-minor) token order
            t = prompt.shape[1]
            full = torch.zeros(n, *self.layout.shape, dtype=torch.long, device=self.device)
            full[:, :t] = prompt.to(self.device).long()
            fixed = t * (full[0, 0].numel())
            prompt_tokens = self.flatten_codes(full)[:, :fixed].repeat(rows // n, 1)
        with self.evaluating():
            tokens = torch.zeros(rows, self.seq_len, dtype=torch.long, device=self.device)
            cache = self.transformer.new_cache(rows, self.seq_len) if use_cache else None
            for t in range(self.seq_len):
                if cache is not None:  # feed position t only: the start token, then the last code
                    x = self._inputs(tokens[:, :0], labels, rows) if t == 0 else self.embed(tokens[:, t - 1 : t], t)
                    h, _ = self.transformer(x if ctx is None else x + ctx[:, t : t + 1], cache)
                else:
                    x = self._inputs(tokens[:, :t], labels, rows)
                    h, _ = self.transformer(x if ctx is None else x + ctx[:, : t + 1])
                logits = self.head(h[:, -1]).float()
                if guided:
                    logits = cfg_logits(logits[:n], logits[n:], cfg_scale)
                nxt = sample_from_logits(logits, temperature, generator, top_k=top_k, top_p=top_p)
                tokens[:, t] = prompt_tokens[:, t] if t < fixed else nxt.repeat(rows // n)
        return self.unflatten_codes(tokens[:n])
