"""Recording what the routers of a model decide, for the "what experts learn" plots of ``evaluate``.

:class:`RoutingRecorder` wraps :meth:`layers.moe.layer.MoE.route` of every MoE layer of a model for
the duration of a ``with`` block (nothing is copied into the model and nothing changes when the block
ends), keeps the raw assignments of each forward, and on :meth:`RoutingRecorder.commit` tallies them
against what the caller knows about the tokens of that forward:

- per expert: the assignments (the load) and the tokens whose assignment capacity dropped;
- expert x position in the layer's sequence (for a tokenizer: the spatial position of a feature map);
- expert x class, from one label per sample;
- expert x value, from one integer per token (a prior's code at that position), right-aligned to the
  layer's sequence so leading prefix tokens (a class token) have no value.

Soft routers (Soft MoE) mix every token into every slot and make no assignment; they are listed in
:attr:`RoutingRecorder.soft_layers` and tallied nowhere.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from .contract import Routing
from .layer import MoE


@dataclass
class LayerTally:
    """Assignment counts of one MoE layer over everything committed so far."""

    num_experts: int
    load: Tensor = field(init=False)  # (E,) assignments per expert
    position: Tensor | None = None  # (T, E), T = the longest sequence seen
    by_class: Tensor | None = None  # (C, E)
    by_value: Tensor | None = None  # (V, E)
    entropy_sum: float = 0.0
    dropped_sum: float = 0.0
    forwards: int = 0
    pending: list[tuple[Routing, int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.load = torch.zeros(self.num_experts, dtype=torch.long)

    @property
    def mean_entropy(self) -> float:
        """Mean router entropy (nats) over the recorded forwards."""
        return self.entropy_sum / max(self.forwards, 1)

    @property
    def mean_dropped(self) -> float:
        """Mean fraction of assignments dropped by expert capacity over the recorded forwards."""
        return self.dropped_sum / max(self.forwards, 1)


def _grow(table: Tensor | None, rows: int, cols: int) -> Tensor:
    """A zero-padded (rows, cols) count table holding ``table`` in its top rows."""
    if table is not None and table.shape[0] >= rows:
        return table
    grown = torch.zeros(rows, cols, dtype=torch.long)
    if table is not None:
        grown[: table.shape[0]] = table
    return grown


def _add_pairs(table: Tensor | None, rows: Tensor, experts: Tensor, num_experts: int) -> Tensor:
    rows, experts = rows.cpu(), experts.cpu()
    table = _grow(table, int(rows.max()) + 1 if rows.numel() else 0, num_experts)
    return table.index_put_((rows, experts), torch.ones_like(rows), accumulate=True)


class RoutingRecorder:
    """``with RoutingRecorder(model) as rec: model(x); rec.commit(labels=y)`` — see the module doc."""

    def __init__(self, model: nn.Module) -> None:
        self.layers: dict[str, MoE] = {name: m for name, m in model.named_modules() if isinstance(m, MoE)}
        self.tallies = {name: LayerTally(m.experts.num_experts) for name, m in self.layers.items()}
        self.soft_layers = sorted(name for name, m in self.layers.items() if getattr(m.router, "soft", False))
        self._hooks: list = []
        self._dropped: dict[str, list[float]] = {}

    def __bool__(self) -> bool:
        return bool(self.layers)

    def __enter__(self) -> RoutingRecorder:
        for name, layer in self.layers.items():
            if name in self.soft_layers:
                continue
            layer.route = self._wrap(name, layer)  # an instance attribute shadows the method
            self._hooks.append(layer.register_forward_hook(self._dropped_hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for layer in self.layers.values():
            layer.__dict__.pop("route", None)
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()

    def _dropped_hook(self, name: str):
        def hook(module: nn.Module, args: object, output: tuple[Tensor, dict[str, Tensor]]) -> None:
            self._dropped.setdefault(name, []).append(float(output[1]["dropped_fraction"]))

        return hook

    def _wrap(self, name: str, layer: MoE):
        original = type(layer).route.__get__(layer)

        def route(x: Tensor) -> Routing:
            r = original(x)
            b, t = (1, x.shape[0]) if x.dim() == 2 else (x.shape[0], x.shape[1])
            mapped = r.expert_idx if layer.expert_map is None else layer.expert_map[r.expert_idx]
            self.tallies[name].pending.append((Routing(r.token_idx.detach(), mapped.detach(), r.gate.detach(),
                                                       r.loss.detach(), r.load, r.entropy.detach()), b, t))
            return r

        return route

    def discard(self) -> None:
        """Forget the forwards not yet committed (e.g. a sampling loop's, whose tokens have no labels)."""
        for tally in self.tallies.values():
            tally.pending.clear()
        self._dropped.clear()

    def commit(self, labels: Tensor | None = None, values: Tensor | None = None) -> None:
        """Tally the forwards since the last commit. ``labels`` (B,) are the samples' classes; ``values``
        (B, L) one integer per token (right-aligned to each layer's sequence). A forward whose batch is
        not B (e.g. a CFG-doubled batch) is counted in load, position and entropy only."""
        for name, tally in self.tallies.items():
            tally.dropped_sum += sum(self._dropped.pop(name, []))
            for r, b, t in tally.pending:
                tally.forwards += 1
                tally.entropy_sum += float(r.entropy)
                experts = r.expert_idx.cpu()
                tally.load += torch.bincount(experts, minlength=tally.num_experts)
                if experts.numel() == 0:
                    continue
                sample, pos = r.token_idx.cpu() // t, r.token_idx.cpu() % t
                tally.position = _add_pairs(tally.position, pos, experts, tally.num_experts)
                if labels is not None and len(labels) == b:
                    tally.by_class = _add_pairs(tally.by_class, labels.cpu().long()[sample], experts, tally.num_experts)
                if values is not None and len(values) == b and values.shape[1] <= t:
                    start = t - values.shape[1]
                    keep = pos >= start
                    v = values.cpu().long()[sample[keep], pos[keep] - start]
                    tally.by_value = _add_pairs(tally.by_value, v, experts[keep], tally.num_experts)
            tally.pending.clear()

    def items(self) -> Iterator[tuple[str, LayerTally]]:
        return iter(self.tallies.items())


def mutual_information_bits(table: Tensor) -> float:
    """I(row; expert) in bits of a (rows, experts) count table: 0 when routing ignores the row variable,
    up to log2(min(rows, experts)) when each row goes to its own expert."""
    p = table.double() / table.sum().clamp_min(1)
    pr, pe = p.sum(1, keepdim=True), p.sum(0, keepdim=True)
    nz = p > 0
    return float((p[nz] * (p[nz] / (pr * pe).expand_as(p)[nz]).log2()).sum())
