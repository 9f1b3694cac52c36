"""Quantizers: one file per family, all behind the :class:`Quantizer` contract."""

from stage1.quantizers.base import Quantizer, QuantizerOutput

__all__ = ["Quantizer", "QuantizerOutput"]
