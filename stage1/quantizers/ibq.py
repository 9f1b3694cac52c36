"""IBQ: index backpropagation quantization (Shi et al. 2024, "Taming Scalable Visual Tokenizer for
Autoregressive Image Generation").

Codes are chosen by the largest logit ``z . E^T``. The quantized vector is straight-through over the
*index*: ``one_hot = hard - sg(soft) + soft`` with ``soft = softmax(logits)``, and ``z_q = one_hot E``
(the official code's ``IndexPropagationQuantize``). The forward value is exactly the selected code.
Backward, with ``g = dL/dz_q``:

- the codebook's *direct* gradient is ``one_hot^T g`` evaluated, i.e. ``hard^T g``: only selected codes;
- ``dL/d soft = g E^T`` flows through the softmax into the logits ``z . E^T``, and from there into
  *every* code (``dlogits^T z``) and into the encoder (``dlogits E``) - this is how IBQ trains
  the whole codebook.

The product is computed without the hard one-hot: ``z_q = E[idx] + (soft - sg(soft)) sg(E)``, which has
the same value and exactly these gradients (``sg(E)`` keeps the soft path from adding a ``soft^T g``
term to the codebook's direct gradient).

Double quantization loss, as in the paper: ``||z_q - z||^2`` (through the index straight-through) +
``||sg(E[idx]) - z||^2`` + ``beta ||E[idx] - sg(z)||^2``; plus the optional entropy penalty on
``softmax(logits / entropy_temperature)``.

Memory: the ``N x K`` softmax is the method (every code receives gradient) and is kept for backward;
it is built once, the raw logits are released right after, and inference (``encode`` / eval
``forward`` without grad) uses the chunked argmax with no ``N x K`` tensor. Keep ``N x K`` within
memory by the batch size, e.g. 16k rows x 16k codes = 1 GiB fp32.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from stage1.quantizers._vq_ops import best_score, default_chunk_rows, soft_entropy_terms
from stage1.quantizers.base import Quantizer, QuantizerOutput, from_rows, to_rows, usage_stats


class IndexBackpropQuantizer(Quantizer):
    """IBQ quantizer; codes ``(B, *grid)``, z_q shaped like ``z``."""

    def __init__(
        self,
        dim: int,
        codebook_size: int,
        *,
        beta: float = 0.25,
        entropy_weight: float = 0.0,
        entropy_temperature: float = 0.01,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__()
        self.dim = dim
        self.codebook_size = codebook_size
        self.beta = beta
        self.entropy_weight = entropy_weight
        self.entropy_temperature = entropy_temperature
        self.chunk_size = chunk_size or default_chunk_rows(codebook_size)
        self.embed = nn.Parameter(torch.randn(codebook_size, dim) * dim**-0.5)

    @property
    def codebook(self) -> Tensor:
        return self.embed.detach().float()

    def forward(self, z: Tensor) -> QuantizerOutput:
        rows, grid = to_rows(z)
        with torch.autocast(z.device.type, enabled=False):
            rows = rows.float()
            codes = self.embed.float()
            stats: dict[str, Tensor] = {}
            if not (torch.is_grad_enabled() and (rows.requires_grad or codes.requires_grad)):
                idx = best_score(rows, codes, chunk_rows=self.chunk_size)
                hard = codes.index_select(0, idx)
                z_q, loss = hard, F.mse_loss(hard, rows) * (2.0 + self.beta)  # all three terms, same value
            else:
                logits = rows @ codes.t()
                idx = logits.argmax(dim=1)
                if self.entropy_weight > 0:
                    per_sample, batch = soft_entropy_terms(logits / self.entropy_temperature)
                    stats["entropy_per_sample"], stats["entropy_batch"] = per_sample.detach(), batch.detach()
                    entropy = self.entropy_weight * (per_sample - batch)
                else:
                    entropy = rows.new_zeros(())
                # Only the softmax carries the soft path's gradient; the codebook enters it detached.
                soft_q = torch.softmax(logits, dim=1) @ codes.detach()
                del logits
                hard = codes.index_select(0, idx)
                z_q = hard + (soft_q - soft_q.detach())
                loss = (
                    F.mse_loss(z_q, rows)
                    + F.mse_loss(rows, hard.detach())
                    + self.beta * F.mse_loss(hard, rows.detach())
                    + entropy
                )
            stats.update(usage_stats(idx, self.codebook_size))
            stats["commit_loss"] = F.mse_loss(rows.detach(), hard.detach())
        return QuantizerOutput(from_rows(z_q.to(z.dtype), grid), idx.view(grid), loss, stats)

    def encode(self, z: Tensor) -> Tensor:
        rows, grid = to_rows(z)
        with torch.autocast(z.device.type, enabled=False):
            return best_score(rows.float().detach(), self.codebook, chunk_rows=self.chunk_size).view(grid)

    def decode(self, codes: Tensor) -> Tensor:
        grid = tuple(codes.shape)
        return from_rows(self.embed.float().index_select(0, codes.reshape(-1).long()), grid)
