"""Cross-entropy reconstruction for categorical data stored one-hot in channel groups.

A symbolic-music window arrives as ``(B, G * K, L)``: ``G`` groups (voices) of ``K`` one-hot classes
(rest, hold, pitches). Regressing pitch numbers with MSE would call a semitone off "nearly right"
and average two plausible notes into a third; the decoder instead emits ``K`` logits per group and
is trained with the mean cross-entropy against the target class of every group and step.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def grouped(x: Tensor, classes: int) -> Tensor:
    """``(B, G * K, *spatial) -> (B, K, G, *spatial)``: classes on dim 1, as ``F.cross_entropy`` wants."""
    if x.shape[1] % classes:
        raise ValueError(f"{x.shape[1]} channels are not whole groups of {classes} classes")
    b, groups = x.shape[0], x.shape[1] // classes
    return x.reshape(b, groups, classes, *x.shape[2:]).transpose(1, 2)


def grouped_cross_entropy(logits: Tensor, target: Tensor, classes: int) -> Tensor:
    """Mean cross-entropy of each group's logits against the argmax of the one-hot ``target`` group."""
    return F.cross_entropy(grouped(logits, classes), grouped(target, classes).argmax(1))


def grouped_softmax(logits: Tensor, classes: int) -> Tensor:
    """Class probabilities per group, in the input's ``(B, G * K, *spatial)`` layout."""
    return grouped(logits, classes).softmax(1).transpose(1, 2).reshape(logits.shape)
