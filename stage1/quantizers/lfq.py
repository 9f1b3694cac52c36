"""Lookup-free quantization (LFQ, MAGVIT-v2: Yu et al. 2023, "Language Model Beats Diffusion").

Each of ``bits`` channels is quantized independently to ``±codebook_scale`` by its sign; the code
is the integer whose bit ``i`` is 1 where channel ``i`` is positive, so the implicit codebook
has ``2**bits`` entries and no parameters. Training adds a commitment loss ``beta * ||h - sg(q)||^2`` and MAGVIT-v2's
entropy loss ``E_n[H(p_n)] - diversity_weight * H(E_n[p_n])`` where ``p_n`` is the soft
assignment ``softmax_c(-||z_n - c||^2 / temperature)`` over the codes.

The soft assignment factorises over bits. For ``c in {-s, +s}^D``,
``||z - c||^2 = sum_d (z_d - c_d)^2`` is a sum of per-bit terms, so the softmax is a product of
per-bit Bernoullis with ``P(bit_d = 1) = sigmoid(x_d)``, ``x_d = 4 s z_d / temperature``. Hence:

* the per-sample entropy is *exactly* the sum of per-bit binary entropies (no ``N x 2^D`` table);
* the batch term is computed **per bit-factorised sub-code** (the default): the ``bits`` are split
  into ``ceil(bits / entropy_group_bits)`` contiguous groups of near-equal size (MAGVIT-v2's
  factorised codes; Open-MAGVIT2 splits 18 bits into 9 + 9), and the batch term is the sum over
  groups of the exact entropy of the batch-averaged distribution of that group's sub-code,
  ``H(E_n[p_n^(g)])`` over its ``2^|g|`` values (``log p_n^(g)(c) = sum_d logsigmoid(-x_d) + x . c_bits``:
  one ``N x 2^|g|`` matmul per group). Within a group, correlated bits are penalised (two
  always-equal bits score 1 bit, not 2); across groups only the marginals count, so this is an upper
  bound on the joint entropy, equal to it when ``bits <= entropy_group_bits``. Default
  ``entropy_group_bits = 9``: exact up to 512 codes, 9 + 9 for 18 bits, memory ``O(N 2^9)``.
* ``exact_entropy=True`` (allowed for ``bits <= 12``) uses one group of all bits, i.e. the true
  batch entropy over every code; ``entropy_group_bits=1`` gives the per-bit marginals (the
  cheapest and loosest bound). :meth:`LFQ.exact_entropies` builds the full softmax table over all
  codes from the distances (the tests cross-check the factorised forms against it).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from metrics.codebook import histogram_stats
from stage1.quantizers.base import Quantizer, QuantizerOutput, usage_stats
from stage1.quantizers.fsq import flat_channels, pointwise

EXACT_MAX_BITS = 12
HISTOGRAM_MAX_BITS = 20


def binary_entropy(p: Tensor, eps: float = 1e-6) -> Tensor:
    """Elementwise entropy (nats) of Bernoulli(p); clamped so saturated probabilities give zero gradient, not NaN."""
    p = p.clamp(eps, 1 - eps)
    return -(p * p.log() + (1 - p) * (1 - p).log())


def binary_entropy_from_logits(x: Tensor) -> Tensor:
    """Entropy of Bernoulli(sigmoid(x)) as ``p softplus(-x) + (1-p) softplus(x)``: finite gradients at any x."""
    p = torch.sigmoid(x)
    return p * F.softplus(-x) + (1 - p) * F.softplus(x)


class LFQ(Quantizer):
    """Sign quantizer with one bit per channel; projects ``dim -> bits`` (and back) when they differ."""

    def __init__(
        self,
        bits: int,
        dim: int | None = None,
        codebook_scale: float = 1.0,
        beta: float = 0.25,
        entropy_weight: float = 0.1,
        diversity_weight: float = 1.0,
        temperature: float = 0.01,
        exact_entropy: bool = False,
        entropy_group_bits: int = 9,
        exact_chunk: int = 4096,
    ) -> None:
        super().__init__()
        if bits < 1 or bits > 62:
            raise ValueError(f"LFQ needs 1 <= bits <= 62 for int64 codes, got {bits}")
        if exact_entropy and bits > EXACT_MAX_BITS:
            raise ValueError(
                f"exact_entropy materialises N x 2^bits probabilities and is limited to bits <= {EXACT_MAX_BITS}; "
                f"got bits={bits}. Use the factorised default."
            )
        if not 1 <= entropy_group_bits <= EXACT_MAX_BITS:
            raise ValueError(f"entropy_group_bits must lie in [1, {EXACT_MAX_BITS}], got {entropy_group_bits}")
        self.bits = int(bits)
        self.dim = int(dim) if dim is not None else self.bits
        self.codebook_size = 2**self.bits
        self.codebook_scale = float(codebook_scale)
        self.beta = float(beta)  # the commitment weight, named as in every other quantizer
        self.entropy_weight = float(entropy_weight)
        self.diversity_weight = float(diversity_weight)
        self.temperature = float(temperature)
        self.exact_entropy = bool(exact_entropy)
        self.exact_chunk = int(exact_chunk)
        group_bits = self.bits if self.exact_entropy else int(entropy_group_bits)
        n_groups = -(-self.bits // group_bits)
        # Contiguous groups of near-equal size (14 bits at 9 per group -> 7 + 7).
        self.entropy_groups = [len(g) for g in torch.arange(self.bits).tensor_split(n_groups)]
        self.register_buffer("_powers", 2 ** torch.arange(self.bits, dtype=torch.long), persistent=False)
        needs_proj = self.dim != self.bits
        self.project_in = nn.Linear(self.dim, self.bits) if needs_proj else nn.Identity()
        self.project_out = nn.Linear(self.bits, self.dim) if needs_proj else nn.Identity()

    # -- bits <-> integers ------------------------------------------------------------------
    def bits_to_indices(self, positive: Tensor) -> Tensor:
        """Boolean ``(..., bits)`` (True where the channel is positive) -> integers ``(...)``; bit i = channel i."""
        return (positive.long() * self._powers).sum(dim=-1)

    def indices_to_codes(self, indices: Tensor) -> Tensor:
        """Integers ``(...)`` -> code vectors ``(..., bits)`` of ``±codebook_scale`` (float32)."""
        positive = (indices.long().unsqueeze(-1) & self._powers) != 0
        return torch.where(positive, self.codebook_scale, -self.codebook_scale).float()

    # -- entropy terms ----------------------------------------------------------------------
    def bit_logits(self, rows: Tensor) -> Tensor:
        """Per-bit logit of ``P(bit = 1)`` under the soft assignment: ``4 s z / temperature``, shape ``(N, bits)``."""
        return 4.0 * self.codebook_scale * rows / self.temperature

    def factorised_entropies(self, rows: Tensor, axis: int = -1) -> tuple[Tensor, Tensor]:
        """(mean per-sample entropy - exact, batch entropy summed over the bit groups), nats.

        ``rows`` holds the ``bits`` channels on ``axis`` (``(N, bits)`` by default, or ``(B, bits, L)``).
        """
        logits = self.bit_logits(rows.movedim(axis, -1)).reshape(-1, self.bits)
        per_sample = binary_entropy_from_logits(logits).sum(dim=-1).mean()
        batch = sum(self._group_batch_entropy(x) for x in logits.split(self.entropy_groups, dim=1))
        return per_sample, batch

    def _group_batch_entropy(self, logits: Tensor) -> Tensor:
        """Entropy of the batch-averaged distribution of one group's sub-code, from its bit logits ``(N, g)``."""
        g = logits.shape[1]
        if g == 1:  # closed form: a Bernoulli
            return binary_entropy(torch.sigmoid(logits).mean())
        powers = 2 ** torch.arange(g, device=logits.device)
        code_bits = ((torch.arange(2**g, device=logits.device).unsqueeze(1) & powers) != 0).to(logits.dtype)
        # log P(c) = sum_d [b_d logsigmoid(x_d) + (1 - b_d) logsigmoid(-x_d)] = sum_d logsigmoid(-x_d) + x . b
        log_p = F.logsigmoid(-logits).sum(1, keepdim=True) + logits @ code_bits.t()
        avg = log_p.exp().mean(0)
        # Clamp inside the log only: unused codes add 0 to the entropy and a finite gradient.
        return -(avg * avg.clamp_min(1e-12).log()).sum()

    def exact_entropies(self, rows: Tensor) -> tuple[Tensor, Tensor]:
        """Same two terms from the full ``N x 2^bits`` soft assignment, built ``exact_chunk`` rows at a time."""
        if self.bits > EXACT_MAX_BITS:
            raise ValueError(f"exact entropies are limited to bits <= {EXACT_MAX_BITS}, got {self.bits}")
        codes = self.indices_to_codes(torch.arange(self.codebook_size, device=rows.device))
        code_sq = (codes**2).sum(dim=-1)
        per_sample_sum = rows.new_zeros(())
        avg = rows.new_zeros(self.codebook_size)
        for chunk in rows.split(self.exact_chunk):
            dist = (chunk**2).sum(-1, keepdim=True) - 2 * chunk @ codes.T + code_sq
            logp = F.log_softmax(-dist / self.temperature, dim=-1)
            prob = logp.exp()
            per_sample_sum = per_sample_sum - (prob * logp).sum()
            avg = avg + prob.sum(dim=0)
        n = rows.shape[0]
        avg = avg / n
        # Clamp inside the log only: unused codes add 0 to the entropy and a finite gradient.
        return per_sample_sum / n, -(avg * avg.clamp_min(1e-12).log()).sum()

    def _usage(self, codes: Tensor) -> dict[str, Tensor]:
        if self.bits <= HISTOGRAM_MAX_BITS:
            return usage_stats(codes, self.codebook_size)
        # A dense histogram of 2^bits bins would dwarf the batch: count only the codes that occur.
        _, counts = torch.unique(codes.reshape(-1), return_counts=True)
        stats = histogram_stats(counts, self.codebook_size)
        return {"perplexity": stats["perplexity"], "usage": stats["usage"]}

    # -- contract ---------------------------------------------------------------------------
    # Latents stay channel-first, flattened to (B, C, L) (a view): projections are 1x1 convs, so no
    # channels-last copy of the latent is made.
    def _project(self, z: Tensor) -> Tensor:
        # Signs, distances and entropies in float32: bf16 logits at temperature 0.01 are too coarse.
        with torch.autocast(device_type=z.device.type, enabled=False):
            return pointwise(self.project_in, flat_channels(z).float())

    def _indices(self, positive: Tensor) -> Tensor:
        return (positive.long() * self._powers.unsqueeze(-1)).sum(dim=1)

    def forward(self, z: Tensor) -> QuantizerOutput:
        code_shape = (z.shape[0], *z.shape[2:])
        with torch.autocast(device_type=z.device.type, enabled=False):
            h = self._project(z)  # (B, bits, L) fp32
            positive = h > 0
            q = torch.where(positive, self.codebook_scale, -self.codebook_scale)
            q_st = h + (q - h).detach()
            loss = self.beta * F.mse_loss(h, q)
            if self.exact_entropy:
                per_sample, batch = self.exact_entropies(h.movedim(1, -1).reshape(-1, self.bits))
            else:
                per_sample, batch = self.factorised_entropies(h, axis=1)
            if self.training:
                loss = loss + self.entropy_weight * (per_sample - self.diversity_weight * batch)
        codes = self._indices(positive).reshape(code_shape)
        z_q = pointwise(self.project_out, q_st) if self.dim != self.bits else q_st.to(z.dtype)
        stats = self._usage(codes)
        stats.update(
            entropy_per_sample=per_sample.detach(),
            entropy_batch=batch.detach(),
            commit_loss=F.mse_loss(h.detach(), q),
        )
        return QuantizerOutput(z_q=z_q.reshape(z.shape), codes=codes, loss=loss, stats=stats)

    def encode(self, z: Tensor) -> Tensor:
        return self._indices(self._project(z) > 0).reshape(z.shape[0], *z.shape[2:])

    def decode(self, codes: Tensor) -> Tensor:
        q = self.indices_to_codes(codes.reshape(codes.shape[0], -1)).movedim(-1, 1)  # (B, bits, L)
        z_q = pointwise(self.project_out, q.contiguous())
        return z_q.reshape(codes.shape[0], z_q.shape[1], *codes.shape[1:])
