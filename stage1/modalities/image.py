"""The ``image`` modality: ``(B, C, H, W)`` in [-1, 1]; LPIPS perceptual loss; PNG grids; PSNR/SSIM/LPIPS/FID."""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from data.atomic import atomic_write
from metrics.lpips_offline import load_lpips, prepare_lpips_inputs
from metrics.precision_recall import PrecisionRecall
from metrics.reconstruction import ReconstructionMetrics
from stage1.modalities._image_features import choose_features, choose_lpips
from stage1.modalities.base import Evaluator, Modality


def save_grid(images: Tensor, path: str | Path, nrow: int = 8, padding: int = 2) -> Path:
    """Save ``(N, C, H, W)`` images in ``[-1, 1]`` as one PNG grid; returns the path."""
    from PIL import Image
    from torchvision.utils import make_grid

    grid = make_grid(((images.float().clamp(-1, 1) + 1) / 2), nrow=max(1, nrow), padding=padding, pad_value=1.0)
    arr = (grid.mul(255).round().to(torch.uint8).permute(1, 2, 0).numpy())
    if arr.shape[2] == 1:
        arr = arr[:, :, 0]
    return atomic_write(path, lambda f: Image.fromarray(arr).save(f, format="PNG"))


class LPIPSLoss(nn.Module):
    """Mean LPIPS distance of a batch, for grey or small images too (see ``prepare_lpips_inputs``)."""

    def __init__(self, net: nn.Module, backbone: str) -> None:
        super().__init__()
        self.net, self.backbone = net, backbone

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        prep = [prepare_lpips_inputs(t.float(), self.backbone) for t in (reconstruction, target)]
        return self.net(*prep).mean()


class ImageReconstruction(Evaluator):
    """MSE, PSNR, SSIM, LPIPS (when its weights are present) and rFID of reconstructions."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        device = options.get("device", "cpu")
        features = choose_features(options.get("fid", "auto"), options.get("classifier"), options.get("dataset"),
                                   options.get("inception_weights"))
        lpips, lpips_note = choose_lpips(options.get("lpips", "auto"))
        self.notes = [features.note, lpips_note]
        self.recon = ReconstructionMetrics(lpips_module=lpips).to(device)
        self.fid = features.fid.to(device) if features.fid is not None else None

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        self.recon.update(fake.float(), real.float())
        if self.fid is not None:
            self.fid.update(real, real=True)
            self.fid.update(fake, real=False)

    def compute(self) -> dict[str, Any]:
        results: dict[str, Any] = {k: float(v) for k, v in self.recon.compute().items()}
        if self.fid is not None:
            r = self.fid.result()
            results |= {"rfid": r.value, "rfid_features": r.feature_extractor, "rfid_num_real": r.num_real,
                        "rfid_num_fake": r.num_fake, "rfid_resolution": list(r.resolution or [])}
        return results


class ImageSamples(Evaluator):
    """FID and precision/recall on the same features, and the domain classifier's accuracy on
    class-conditional samples."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        device = options.get("device", "cpu")
        self.features = choose_features(options.get("fid", "auto"), options.get("classifier"),
                                        options.get("dataset"), options.get("inception_weights"))
        self.notes = [self.features.note]
        self.fid = self.features.fid.to(device) if self.features.fid is not None else None
        self.pr = PrecisionRecall().to(device) if self.fid is not None else None
        clf = self.features.classifier
        self.classifier = clf.to(device) if clf is not None else None
        self.correct = self.labelled = 0

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        for x, is_real in ((real, True), (fake, False)):
            if x is not None and self.fid is not None:
                self.fid.update(x, real=is_real)
                self.pr.update(self.features.features(x), real=is_real)
        if fake is not None and labels is not None and self.classifier is not None:
            self.correct += int((self.classifier(fake).argmax(1) == labels).sum())
            self.labelled += len(labels)

    def compute(self) -> dict[str, Any]:
        results: dict[str, Any] = {}
        if self.fid is not None:
            r = self.fid.result()
            results |= {"fid": r.value, "fid_features": r.feature_extractor, "fid_num_real": r.num_real,
                        "fid_num_fake": r.num_fake, "fid_resolution": list(r.resolution or [])}
            results |= {k: float(v) for k, v in self.pr.compute().items()}
        if self.labelled:
            results["classifier_accuracy"] = self.correct / self.labelled
            results["classifier"] = self.features.classifier.checkpoint_path
        return results


class ImageModality(Modality):
    name = "image"
    datamodule = "data.images.ImageDataModule"

    def perceptual_loss(self, options: Mapping[str, Any]) -> tuple[nn.Module | None, str]:
        """LPIPS with local weights; options ``net`` (vgg/alex), ``required``, ``weights_dir``,
        ``random_weights`` (a random trunk with the shipped heads, for tests)."""
        opts = dict(options)
        backbone = opts.pop("net", "vgg")
        random_weights = bool(opts.pop("random_weights", False))
        net, reason = load_lpips(net=backbone, required=bool(opts.pop("required", False)),
                                 weights_dir=opts.pop("weights_dir", None), pretrained=not random_weights)
        if opts:
            raise ValueError(f"unknown model.params.perceptual keys {sorted(opts)}; valid: net, required, "
                             "weights_dir, random_weights")
        if net is None:
            return None, f"{reason} Training continues WITHOUT the perceptual (LPIPS) term; set " \
                         "model.params.perceptual.required=true to make this an error."
        return LPIPSLoss(net.requires_grad_(False).eval(), backbone), f"LPIPS ({backbone})"

    def validation_metrics(self) -> ReconstructionMetrics:
        return ReconstructionMetrics()

    def save_reconstructions(self, x: Tensor, xrec: Tensor, path: str | Path) -> Path:
        """Top row inputs, bottom row reconstructions."""
        return save_grid(torch.cat([x, xrec]).cpu(), path, nrow=len(x))

    def save_preview(self, x: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
        return save_grid(x.cpu(), path, nrow=int(math.ceil(math.sqrt(len(x)))))

    def write_samples(self, x: Tensor, out: Path, labels: Tensor | None = None) -> list[Path]:
        """``grid.png`` and one ``NNNNN.png`` per sample."""
        files = [self.save_preview(x, out / "grid.png")]
        files += [save_grid(img[None].cpu(), out / f"{i:05d}.png", nrow=1, padding=0) for i, img in enumerate(x)]
        return files

    def reconstruction_evaluator(self, options: Mapping[str, Any]) -> ImageReconstruction:
        return ImageReconstruction(options)

    def sample_evaluator(self, options: Mapping[str, Any]) -> ImageSamples:
        return ImageSamples(options)


MODALITY = ImageModality()
