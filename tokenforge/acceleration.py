"""Run-time speed options of training that change how a model runs, never what it computes.

They are not constructor arguments, so they are never stored in a checkpoint's hyperparameters and a
checkpoint trained with them loads anywhere:

- ``model.params.compile``: ``true`` (inductor) or a ``torch.compile`` backend name. Compiles, in
  place (state-dict keys unchanged), each transformer block (:class:`layers.transformer.Block`) and a
  tokenizer's ``encoder`` and ``decoder``: the units whose shapes stay fixed during training, so one
  graph each serves every step. Sampling and tokenizing run the loaded, uncompiled model.
- ``model.params.channels_last``: convolution weights in channels-last memory order (NHWC), which
  cuDNN's tensor-core kernels and oneDNN prefer; convolutions then produce channels-last outputs.
- ``allow_tf32`` (top level, default true): TF32 tensor-core matmuls and convolutions on Ampere+ GPUs
  (``torch.backends.cuda.matmul.allow_tf32`` and ``torch.backends.cudnn.allow_tf32``).
- ``fused_optimizer`` (top level, default true): every Adam/AdamW a model configures steps with
  torch's fused kernel (one kernel for all parameters, on CPU as on CUDA) when its parameters allow it.

Mixed precision is Lightning's ``trainer.precision: bf16-mixed``; the quantizers keep their distances
and codebook statistics in fp32 under autocast on their own.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from layers.instantiate import ConfigError
from layers.transformer import Block

RUNTIME_MODEL_PARAMS = ("compile", "channels_last")
COMPILED_TOKENIZER_PARTS = ("encoder", "decoder")


def split_runtime_params(model_spec: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``model_spec`` without the run-time options, and those options (``compile``, ``channels_last``)."""
    spec = dict(model_spec)
    params = dict(spec.get("params") or {})
    options = {key: params.pop(key) for key in RUNTIME_MODEL_PARAMS if key in params}
    spec["params"] = params
    return spec, options


def compile_units(model: nn.Module) -> list[nn.Module]:
    """The submodules ``compile`` compiles: transformer blocks, a tokenizer's encoder and decoder."""
    units = [m for m in model.modules() if isinstance(m, Block)]
    for name in COMPILED_TOKENIZER_PARTS:
        part = getattr(model, name, None)
        if isinstance(part, nn.Module) and not any(part is u or _contains(part, u) for u in units):
            units.append(part)
    return units


def _contains(outer: nn.Module, inner: nn.Module) -> bool:
    return any(m is inner for m in outer.modules())


def apply_runtime_options(model: nn.Module, options: Mapping[str, Any]) -> list[str]:
    """Apply ``compile`` / ``channels_last`` to ``model``; returns what was done, for the log."""
    done = []
    backend = options.get("compile", False)
    if backend:
        backend = "inductor" if backend is True else str(backend)
        if backend not in torch._dynamo.list_backends(exclude_tags=()):
            raise ConfigError(f"model.params.compile={backend!r} is not a torch.compile backend; use true "
                              f"(inductor) or one of {', '.join(torch._dynamo.list_backends())}")
        units = compile_units(model)
        if not units:
            raise ConfigError(f"model.params.compile: {type(model).__name__} has no transformer blocks and no "
                              "encoder/decoder to compile")
        for unit in units:
            unit.compile(backend=backend)  # in place: parameters and state-dict keys stay the same
        done.append(f"compiled {len(units)} modules with {backend}")
    if options.get("channels_last", False):
        model.to(memory_format=torch.channels_last)  # 4-D weights only; everything else is unchanged
        done.append("convolution weights channels-last")
    return done


def set_tf32(enabled: bool) -> None:
    torch.backends.cuda.matmul.allow_tf32 = bool(enabled)
    torch.backends.cudnn.allow_tf32 = bool(enabled)


def fuse_adam(optimizer: torch.optim.Optimizer) -> bool:
    """Switch an Adam/AdamW that has not stepped yet to torch's fused implementation, in place (its
    schedulers keep their reference). Only when every parameter is a floating tensor on one device
    type that the fused kernel supports; returns whether it was switched."""
    if type(optimizer) not in (torch.optim.Adam, torch.optim.AdamW) or optimizer.state:
        return False
    params = [p for g in optimizer.param_groups for p in g["params"]]
    devices = {p.device.type for p in params}
    if not params or len(devices) != 1 or devices.pop() not in ("cpu", "cuda"):
        return False
    if not all(torch.is_floating_point(p) for p in params):
        return False
    if any(g.get("differentiable") for g in optimizer.param_groups):
        return False
    for group in optimizer.param_groups:
        group["fused"], group["foreach"] = True, False
    optimizer.defaults["fused"], optimizer.defaults["foreach"] = True, False
    return True


def fused_configure_optimizers(module: Any) -> Callable[[], Any]:
    """``module.configure_optimizers`` with the Adam/AdamW optimizers it returns switched to fused.
    (``functools.wraps`` keeps Lightning's override check looking at the original.)"""
    original = module.configure_optimizers

    @functools.wraps(original)
    def configure_optimizers() -> Any:
        configured = original()
        for opt in _optimizers_in(configured):
            fuse_adam(opt)
        return configured

    return configure_optimizers


def _optimizers_in(configured: Any) -> list[torch.optim.Optimizer]:
    """Every optimizer in what ``configure_optimizers`` may return (one, a list/tuple, dicts, pairs)."""
    if isinstance(configured, torch.optim.Optimizer):
        return [configured]
    if isinstance(configured, Mapping):
        return _optimizers_in(configured.get("optimizer"))
    if isinstance(configured, (list, tuple)):
        return [o for item in configured for o in _optimizers_in(item)]
    return []
