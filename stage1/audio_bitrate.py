"""The bitrate table of a residual audio codec: kbps against quality for 1..D active levels.

A residual quantizer trained with quantizer dropout serves every bitrate from one model: decoding the
first ``d`` levels (``stage1.depth_eval.decode_first_levels``) gives the ``d``-level output. Its
bitrate is ``frames/s x d x log2(K) / 1000`` kbps (``K`` codes per level, each frame of each level
one index of ``log2 K`` bits, no entropy coding). Each row reports the audio modality's
reconstruction metrics at that bitrate: mel distance, multi-resolution STFT distance, SI-SNR.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from stage1.depth_eval import decode_first_levels, residual_depth
from stage1.modalities.audio import AudioReconstruction


def kbps(frame_rate: float, levels: int, codebook_size: int) -> float:
    """``frame_rate x levels x log2(codebook_size) / 1000``: the bitrate of ``levels`` code streams."""
    return frame_rate * levels * math.log2(codebook_size) / 1000


def frame_rate(tokenizer: Any) -> float:
    """Code frames per second: the sample rate over the encoder's hop (else over samples per grid step)."""
    spec = tokenizer.code_spec
    rate = float(spec["layout"]["sample_rate"])
    hop = getattr(tokenizer, "hop", None)
    if hop is None:
        hop = float(tokenizer.hparams.resolution) / spec["grid"][-1]
    return rate / float(hop)


class BitrateTable:
    """Accumulates, over a split, the audio reconstruction metrics of decoding with 1..D levels."""

    def __init__(self, depth: int, codebook_size: int, frames_per_second: float, sample_rate: int,
                 options: Mapping[str, Any] | None = None) -> None:
        self.depth, self.codebook_size, self.frames_per_second = depth, codebook_size, frames_per_second
        self.evaluators = [AudioReconstruction(options or {}, sample_rate) for _ in range(depth)]

    @torch.no_grad()
    def update(self, tokenizer: Any, x: Tensor, codes: Tensor) -> None:
        """Decode ``codes`` (the codes of ``x``) with 1..D levels and score each against ``x``."""
        for d, evaluator in enumerate(self.evaluators, start=1):
            xrec = decode_first_levels(tokenizer, codes, d)[..., : x.shape[-1]].clamp(-1, 1)
            evaluator.update(real=x, fake=xrec)

    def compute(self) -> list[dict[str, float]]:
        return [{"levels": d, "kbps": kbps(self.frames_per_second, d, self.codebook_size), **ev.compute()}
                for d, ev in enumerate(self.evaluators, start=1)]


def bitrate_table_for(tokenizer: Any, options: Mapping[str, Any] | None = None) -> BitrateTable | None:
    """A :class:`BitrateTable` for a residual tokenizer of the ``audio`` modality, else ``None``."""
    spec = getattr(tokenizer, "code_spec", None) or {}
    depth = residual_depth(tokenizer)
    if spec.get("modality") != "audio" or depth is None or not spec.get("codebook_size"):
        return None
    return BitrateTable(depth, int(spec["codebook_size"]), frame_rate(tokenizer), int(spec["layout"]["sample_rate"]),
                        options)
