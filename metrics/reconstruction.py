"""Reconstruction quality of a tokenizer: MSE, PSNR, SSIM and (optionally) LPIPS.

Inputs follow the project's image convention, ``(B, C, H, W)`` floats in [-1, 1]. PSNR and
SSIM are defined against a data range; they are computed on images mapped to [0, 1]
(``(x + 1) / 2``, clamped, ``data_range=1.0``) as image libraries and papers do, and MSE is
reported on that same [0, 1] scale so that ``PSNR = -10 log10(MSE)`` per image. LPIPS takes
the [-1, 1] images unchanged, as the ``lpips`` network expects.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchmetrics import Metric, MetricCollection
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.regression import MeanSquaredError

from metrics.lpips_offline import prepare_lpips_inputs


def to_unit_range(x: Tensor) -> Tensor:
    """[-1, 1] -> [0, 1], clamped (reconstructions may overshoot; saved images would be clipped too)."""
    return ((x + 1.0) * 0.5).clamp(0.0, 1.0)


class LPIPSMetric(Metric):
    """Mean LPIPS distance over all images seen, for an already-built LPIPS module (see ``load_lpips``)."""

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    total: Tensor
    count: Tensor

    def __init__(self, lpips_module: nn.Module, **kwargs) -> None:
        super().__init__(**kwargs)
        self.lpips = lpips_module.eval().requires_grad_(False)
        self.add_state("total", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        """``preds``, ``target``: ``(B, C, H, W)`` in [-1, 1]; see ``prepare_lpips_inputs`` for grey/small."""
        if preds.shape != target.shape:
            raise ValueError(f"preds and target shapes differ: {tuple(preds.shape)} vs {tuple(target.shape)}")
        net = getattr(self.lpips, "pnet_type", "vgg")
        preds, target = prepare_lpips_inputs(preds, net), prepare_lpips_inputs(target, net)
        with torch.no_grad():
            dist = self.lpips(preds.float(), target.float()).reshape(-1)
        self.total += dist.double().sum()
        self.count += dist.numel()

    def compute(self) -> Tensor:
        return (self.total / self.count.clamp_min(1)).float()


class ReconstructionMetrics(MetricCollection):
    """``mse``, ``psnr`` (dB, mean over images), ``ssim`` and, given an LPIPS module, ``lpips``.

    Call ``update(recon, target)`` with ``(B, C, H, W)`` images in [-1, 1] (spatial size at
    least 11 for SSIM's Gaussian window); ``compute()`` returns a dict keyed by the names above
    (with ``prefix`` if given). Identical images give ``psnr = inf`` and ``ssim = 1``.
    """

    def __init__(self, lpips_module: nn.Module | None = None, prefix: str | None = None) -> None:
        metrics: dict[str, Metric] = {
            "mse": MeanSquaredError(),
            # Per-image PSNR (reduce over C, H, W) averaged over images, as reported in tokenizer papers.
            "psnr": PeakSignalNoiseRatio(data_range=1.0, dim=(1, 2, 3)),
            "ssim": StructuralSimilarityIndexMeasure(data_range=1.0),
        }
        if lpips_module is not None:
            metrics["lpips"] = LPIPSMetric(lpips_module)
        # compute_groups=False: the members take different inputs ([0, 1] vs [-1, 1]), never share states.
        super().__init__(metrics, prefix=prefix, compute_groups=False)

    def _split_inputs(self, preds: Tensor, target: Tensor) -> None:
        if preds.dim() != 4 or preds.shape != target.shape:
            raise ValueError(
                f"expected two (B, C, H, W) image batches of one shape, got {tuple(preds.shape)} "
                f"and {tuple(target.shape)}"
            )

    def update(self, preds: Tensor, target: Tensor) -> None:  # type: ignore[override]
        self._split_inputs(preds, target)
        preds, target = preds.detach().float(), target.detach().float()
        p01, t01 = to_unit_range(preds), to_unit_range(target)
        for name, metric in self.items(keep_base=True, copy_state=False):
            if name == "lpips":
                metric.update(preds, target)
            elif name == "mse":
                metric.update(p01.flatten(), t01.flatten())
            else:
                metric.update(p01, t01)

    def forward(self, preds: Tensor, target: Tensor) -> dict[str, Tensor]:  # type: ignore[override]
        """Update with the batch and return the batch's own values (as ``Metric.forward`` does)."""
        self._split_inputs(preds, target)
        preds, target = preds.detach().float(), target.detach().float()
        p01, t01 = to_unit_range(preds), to_unit_range(target)
        out = {}
        for name, metric in self.items(keep_base=True, copy_state=False):
            if name == "lpips":
                value = metric(preds, target)
            elif name == "mse":
                value = metric(p01.flatten(), t01.flatten())
            else:
                value = metric(p01, t01)
            out[self._set_name(name)] = value
        return out
