"""A prior whose network is one :class:`layers.transformer.Transformer` over the flattened codes.

The transformer's arguments (``dim, depth, heads, mlp_ratio, norm, mlp, positions, dropout, ffn,
ffn_every, attention, attention_every``) are declared here once; a subclass that wants another
default re-declares just that argument (MaskGIT: ``positions="learned"``) and passes it on.
:meth:`build_transformer` lays the grid out for rope2d (grid, then depth for residual/grouped codes)
and sizes learned positions.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from layers.transformer import Transformer
from stage2.prior import Prior


def init_gpt_weights(module: nn.Module) -> None:
    """GPT-2 initialisation: N(0, 0.02) for linear and embedding weights, zero biases."""
    if isinstance(module, (nn.Linear, nn.Embedding)):
        nn.init.normal_(module.weight, std=0.02)
        if getattr(module, "bias", None) is not None:
            nn.init.zeros_(module.bias)


class TransformerPrior(Prior):
    """Base of transformer priors (AR, MaskGIT, ...); see :class:`stage2.prior.Prior` for the rest."""

    def __init__(
        self,
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
        attention: Mapping[str, Any] | None = None,
        attention_every: int = 1,
        **prior: Any,
    ):
        super().__init__(**prior)
        self.dim = dim

    def build_transformer(self, causal: bool, num_prefix: int = 0, max_len: int | None = None,
                          **extra: Any) -> Transformer:
        """The transformer over ``num_prefix`` prefix tokens and the code tokens (``max_len`` positions,
        default ``num_prefix + seq_len``); rope2d rotates the code tokens by their (grid, depth) cell.
        ``extra`` goes to :class:`layers.transformer.Transformer` as is (e.g. ``cond_dim`` for AdaLN)."""
        hp = self.hparams
        rope2d = hp["positions"] == "rope2d"
        cells = list(self.grid) + ([self.code_depth] if self.code_depth else [])
        max_len = None if rope2d else (max_len or num_prefix + self.seq_len)
        return Transformer(
            hp["dim"], hp["depth"], hp["heads"], causal=causal, mlp_ratio=hp["mlp_ratio"], norm=hp["norm"],
            mlp=hp["mlp"], positions=hp["positions"], max_len=max_len,
            grid=cells if rope2d else None, num_prefix=num_prefix, dropout=hp["dropout"], ffn=hp["ffn"],
            ffn_every=hp["ffn_every"], attention=hp.get("attention"), attention_every=hp.get("attention_every", 1),
            **extra,
        )
