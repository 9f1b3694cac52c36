"""Motion metrics: physical plausibility of joint positions, and feature-space metrics in the spirit
of the HumanML3D / Action2Motion evaluation protocol on a classifier trained on our own clip labels.

Physical plausibility (on joint positions ``(..., T, J, 3)`` in metres, ``up_axis`` up, floor at ``floor``):

* :func:`foot_skating_ratio`: the protocol of GMD (Karunratanakul et al. 2023), also used by OmniControl:
  a foot is *in contact* over a frame step when its height is below ``contact_height`` (5 cm) at both
  ends of the step; a step *skates* when the foot is in contact and its horizontal speed is above
  ``speed_threshold`` (0.5 m/s, i.e. 2.5 cm per frame at 20 fps), both for that step and averaged over a
  centred ``window`` of steps (5, zero-padded at the ends). The ratio is the fraction of steps in which
  either foot skates. Contact comes from height only: a velocity threshold in the contact test would
  make sliding feet "not in contact" and hide the very thing measured.
* :func:`foot_contact_speed`: the mean horizontal speed of the feet over in-contact steps (m/s); 0 for
  perfectly planted feet, whatever thresholds the ratio uses beyond the contact height.
* :func:`ground_penetration`: per frame the depth of the lowest joint below the floor (0 above it),
  averaged over frames (as PhysDiff's "Penetrate").

Joint *positions* are not the body's surface: the DeepMimic ankle sits some centimetres above the sole,
so the caller sets ``floor`` / ``contact_height`` for the skeleton (e.g. from the real data's foot
heights) and compares samples with data under the same settings.

Feature metrics (inputs are feature sequences ``(B, F, T)``, channel-first like the tokenizer's):

* :class:`MotionClipClassifier`: a small 1-D conv net trained on the dataset's clip labels. It stands in
  for the protocol's pretrained motion encoder, which we do not have; the numbers it gives are only
  comparable with numbers from the same checkpoint and are named after it (``clip_classifier_fid``),
  never "FID" of HumanML3D.
* :func:`frechet_distance` (torchmetrics' implementation on the classifier's penultimate features),
  :func:`diversity` (mean distance between two random subsets, paired), :func:`multimodality`
  (the same within each class, averaged over classes, as Action2Motion defines it for action labels),
  and classifier accuracy of class-conditional samples, all gathered by :func:`motion_feature_metrics`.

Imports torch and torchmetrics only (see DESIGN.md).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from data.atomic import atomic_write
from metrics.classifier_fit import fit_classifier

CHECKPOINT_FORMAT = "tokenforge.motion_clip_classifier/1"

# GMD's thresholds (metres, m/s, frames), see the module docstring.
CONTACT_HEIGHT = 0.05
SKATE_SPEED = 0.5
SKATE_WINDOW = 5


# --------------------------------------------------------------------------------------------------
# Physical plausibility
# --------------------------------------------------------------------------------------------------
def _horizontal_axes(up_axis: int) -> list[int]:
    if up_axis not in (0, 1, 2):
        raise ValueError(f"up_axis must be 0, 1 or 2, got {up_axis}")
    return [a for a in range(3) if a != up_axis]


def _check_positions(positions: Tensor) -> Tensor:
    positions = torch.as_tensor(positions)
    if positions.dim() < 3 or positions.shape[-1] != 3:
        raise ValueError(f"positions must be (..., T, J, 3), got {tuple(positions.shape)}")
    return positions.float()


def foot_speeds_and_contacts(
    positions: Tensor,
    foot_joints: Sequence[int],
    fps: float,
    up_axis: int = 1,
    floor: float = 0.0,
    contact_height: float = CONTACT_HEIGHT,
) -> tuple[Tensor, Tensor]:
    """``(speed, contact)``, both ``(..., T - 1, num_feet)``: the horizontal speed of each foot over each
    frame step (m/s), and whether the foot is below ``floor + contact_height`` at both ends of the step."""
    positions = _check_positions(positions)
    if positions.shape[-3] < 2:
        raise ValueError("foot speeds need at least two frames")
    feet = positions[..., list(foot_joints), :]  # (..., T, feet, 3)
    horizontal = feet[..., _horizontal_axes(up_axis)]
    speed = (horizontal[..., 1:, :, :] - horizontal[..., :-1, :, :]).norm(dim=-1) * float(fps)
    low = feet[..., up_axis] - float(floor) < float(contact_height)
    return speed, low[..., 1:, :] & low[..., :-1, :]


def _centred_mean(x: Tensor, window: int) -> Tensor:
    """Moving mean over dim -2 of ``(..., L, C)``, centred, zero-padded (scipy's uniform_filter1d, mode constant)."""
    if window < 1 or window % 2 == 0:
        raise ValueError(f"the averaging window must be odd and positive, got {window}")
    lead, (length, channels) = x.shape[:-2], x.shape[-2:]
    flat = x.reshape(-1, length, channels).transpose(1, 2).reshape(-1, 1, length)
    mean = F.avg_pool1d(flat, window, stride=1, padding=window // 2, count_include_pad=True)
    return mean.reshape(-1, channels, length).transpose(1, 2).reshape(*lead, length, channels)


def foot_skating_ratio(
    positions: Tensor,
    foot_joints: Sequence[int],
    fps: float,
    up_axis: int = 1,
    floor: float = 0.0,
    contact_height: float = CONTACT_HEIGHT,
    speed_threshold: float = SKATE_SPEED,
    window: int = SKATE_WINDOW,
) -> Tensor:
    """Per sequence ``(...)``: the fraction of frame steps in which either foot skates (GMD's protocol)."""
    speed, contact = foot_speeds_and_contacts(positions, foot_joints, fps, up_axis, floor, contact_height)
    return _skating_ratio(speed, contact, speed_threshold, window)


def _skating_ratio(speed: Tensor, contact: Tensor, speed_threshold: float, window: int) -> Tensor:
    skating = contact & (speed > speed_threshold) & (_centred_mean(speed, window) > speed_threshold)
    return skating.any(dim=-1).float().mean(dim=-1)


def foot_contact_speed(
    positions: Tensor,
    foot_joints: Sequence[int],
    fps: float,
    up_axis: int = 1,
    floor: float = 0.0,
    contact_height: float = CONTACT_HEIGHT,
) -> tuple[float, int]:
    """``(mean horizontal foot speed over in-contact steps in m/s, number of such foot-steps)``; NaN if none."""
    speed, contact = foot_speeds_and_contacts(positions, foot_joints, fps, up_axis, floor, contact_height)
    count = int(contact.sum())
    return (float(speed[contact].mean()) if count else float("nan")), count


def ground_penetration(positions: Tensor, up_axis: int = 1, floor: float = 0.0) -> Tensor:
    """Per sequence ``(...)``: the mean over frames of how far the lowest joint is below the floor (0 above)."""
    heights = _check_positions(positions)[..., up_axis] - float(floor)  # (..., T, J)
    return (-heights.amin(dim=-1)).clamp_min(0.0).mean(dim=-1)


def physical_plausibility(
    positions: Tensor,
    foot_joints: Sequence[int],
    fps: float,
    up_axis: int = 1,
    floor: float = 0.0,
    contact_height: float = CONTACT_HEIGHT,
    speed_threshold: float = SKATE_SPEED,
    window: int = SKATE_WINDOW,
) -> dict[str, float]:
    """The plausibility metrics of a batch ``(B, T, J, 3)``, averaged over sequences, plus the contact rate
    (fraction of foot-steps in contact: a skating ratio means little if the feet never touch the floor)."""
    speed, contact = foot_speeds_and_contacts(positions, foot_joints, fps, up_axis, floor, contact_height)
    return {
        "foot_skating_ratio": float(_skating_ratio(speed, contact, speed_threshold, window).mean()),
        "foot_contact_speed": float(speed[contact].mean()) if bool(contact.any()) else float("nan"),
        "foot_contact_rate": float(contact.float().mean()),
        "ground_penetration": float(ground_penetration(positions, up_axis, floor).mean()),
    }


# --------------------------------------------------------------------------------------------------
# The feature extractor: a clip-label classifier
# --------------------------------------------------------------------------------------------------
def _conv_block(c_in: int, c_out: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv1d(c_in, c_out, 5, stride=stride, padding=2), nn.GroupNorm(8, c_out), nn.SiLU())


class MotionClipClassifier(nn.Module):
    """Classifies feature windows ``(B, in_channels, T)`` into clip labels (walk, run, backflip, ...).

    Inputs are standardised with the per-channel mean/std of the training windows (buffers, saved with
    the weights), then three conv blocks (the last two halve the time axis), mean and max pooling over
    time, a ReLU'd ``num_features``-d embedding (the penultimate features the metrics use) and a linear
    head. Any window length works (pooling over time).
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 64, num_features: int = 64,
                 class_names: Sequence[str] = ()) -> None:
        super().__init__()
        if width % 8:
            raise ValueError(f"width must be a multiple of 8 (GroupNorm with 8 groups), got {width}")
        self.hparams = {"in_channels": int(in_channels), "num_classes": int(num_classes), "width": int(width),
                        "num_features": int(num_features), "class_names": [str(c) for c in class_names]}
        self.in_channels, self.num_features = int(in_channels), int(num_features)
        self.class_names = list(self.hparams["class_names"])
        self.register_buffer("mean", torch.zeros(in_channels))
        self.register_buffer("std", torch.ones(in_channels))
        w = int(width)
        self.body = nn.Sequential(_conv_block(in_channels, w, 1), _conv_block(w, w, 2), _conv_block(w, 2 * w, 2))
        self.embed = nn.Sequential(nn.Linear(4 * w, num_features), nn.ReLU())
        self.head = nn.Linear(num_features, num_classes)
        self.checkpoint_path: str | None = None
        self.val_accuracy: float | None = None

    def set_normalisation(self, x: Tensor, min_std_ratio: float = 0.2) -> None:
        """Per-channel mean/std of windows ``(N, C, T)``, each std floored at ``min_std_ratio`` times the median
        channel std. Channels that never vary in the data (the 6-D entries that a 1-DoF knee or elbow leaves
        fixed) would otherwise turn any deviation of a generated motion into thousands of standard
        deviations: with a floor of 1e-4 the classifier fell to chance on val windows plus N(0, 0.05^2) noise
        and on tokenizer reconstructions it should recognise (bench/results/motion.md)."""
        std = x.float().std(dim=(0, 2))
        self.mean.copy_(x.float().mean(dim=(0, 2)))
        self.std.copy_(std.clamp_min(max(float(min_std_ratio * std.median()), 1e-6)))

    def features(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (B, {self.in_channels}, T) feature windows, got {tuple(x.shape)}")
        h = self.body((x.float() - self.mean[:, None]) / self.std[:, None])
        return self.embed(torch.cat([h.mean(-1), h.amax(-1)], dim=1))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))

    def save(self, path: str | os.PathLike, val_accuracy: float | None = None) -> Path:
        """Plain tensors and Python values (``weights_only`` loads it), written atomically."""
        payload = {"format": CHECKPOINT_FORMAT, "hparams": self.hparams,
                   "val_accuracy": None if val_accuracy is None else float(val_accuracy),
                   "state_dict": {k: v.detach().cpu() for k, v in self.state_dict().items()}}
        return atomic_write(path, lambda f: torch.save(payload, f))

    @classmethod
    def load(cls, path: str | os.PathLike) -> MotionClipClassifier:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
            raise ValueError(f"{path} is not a motion clip classifier checkpoint ({CHECKPOINT_FORMAT})")
        model = cls(**payload["hparams"])
        model.load_state_dict(payload["state_dict"])
        model.checkpoint_path, model.val_accuracy = str(path), payload.get("val_accuracy")
        return model.eval()


class ClipClassifierFeatures(nn.Module):
    """The frozen classifier's penultimate features (float64), with ``num_features`` for torchmetrics."""

    def __init__(self, classifier: MotionClipClassifier) -> None:
        super().__init__()
        self.classifier = classifier.eval().requires_grad_(False)
        self.num_features = classifier.num_features

    def train(self, mode: bool = True) -> ClipClassifierFeatures:
        return super().train(False)  # torchmetrics toggles modes; the extractor stays in eval

    @torch.no_grad()
    def forward(self, x: Tensor) -> Tensor:
        return self.classifier.features(x).double()


@torch.no_grad()
def classifier_accuracy(model: MotionClipClassifier, x: Tensor, y: Tensor, batch_size: int = 256) -> float:
    model.eval()
    hits = sum(int((model(x[i:i + batch_size]).argmax(1) == y[i:i + batch_size]).sum())
               for i in range(0, len(x), batch_size))
    return hits / max(len(x), 1)


def train_motion_classifier(
    x: Tensor, y: Tensor, num_classes: int | None = None, class_names: Sequence[str] = (), epochs: int = 10,
    batch_size: int = 64, lr: float = 2e-3, seed: int = 0, **kwargs,
) -> MotionClipClassifier:
    """AdamW (cosine-decayed) on cross-entropy over windows ``x`` ``(N, C, T)`` with labels ``y`` ``(N,)``."""
    torch.manual_seed(seed)
    y = y.long()
    model = MotionClipClassifier(x.shape[1], int(num_classes or int(y.max()) + 1), class_names=class_names, **kwargs)
    model.set_normalisation(x)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=1e-4)
    steps = epochs * ((len(x) + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(steps, 1))
    return fit_classifier(model, x, y, opt, epochs, batch_size, seed, scheduler=sched)


# --------------------------------------------------------------------------------------------------
# Feature-space metrics
# --------------------------------------------------------------------------------------------------
class _Identity(nn.Module):
    """Lets torchmetrics' Fréchet distance run on features computed beforehand."""

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.num_features = num_features

    def forward(self, x: Tensor) -> Tensor:
        return x.double()


def frechet_distance(real: Tensor, fake: Tensor) -> float:
    """The Fréchet distance of two feature sets ``(N, D)`` (torchmetrics' FID computation, on these features)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    if real.dim() != 2 or fake.dim() != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (N, D) feature sets of one width, got {tuple(real.shape)}, {tuple(fake.shape)}")
    fd = FrechetInceptionDistance(feature=_Identity(int(real.shape[1])))
    fd.update(real, real=True)
    fd.update(fake, real=False)
    return max(float(fd.compute()), 0.0)  # the eigenvalue route can give -1e-7 for identical sets


def diversity(features: Tensor, num_pairs: int = 300, seed: int = 0) -> float:
    """Mean Euclidean distance between two random subsets of ``num_pairs`` features, paired in order
    (HumanML3D's ``calculate_diversity``, S_d = 300; capped at the number of samples)."""
    n = len(features)
    if n < 2:
        return float("nan")
    s = min(int(num_pairs), n)
    gen = torch.Generator().manual_seed(seed)
    first, second = torch.randperm(n, generator=gen)[:s], torch.randperm(n, generator=gen)[:s]
    return float((features[first].double() - features[second].double()).norm(dim=1).mean())


def multimodality(features: Tensor, labels: Tensor, num_pairs: int = 20, seed: int = 0) -> float:
    """Diversity within each class (S_l = 20 pairs, capped at the class size), averaged over the classes
    with at least two samples (Action2Motion's multimodality for action-conditioned generation)."""
    values = [diversity(features[labels == c], num_pairs, seed + int(c)) for c in labels.unique().tolist()
              if int((labels == c).sum()) >= 2]
    return float(sum(values) / len(values)) if values else float("nan")


@torch.no_grad()
def classifier_outputs(model: MotionClipClassifier, x: Tensor, batch_size: int = 256) -> tuple[Tensor, Tensor]:
    """``(features, predicted labels)`` of windows ``(N, C, T)`` in eval mode."""
    model.eval()
    feats, preds = [], []
    for i in range(0, len(x), batch_size):
        f = model.features(x[i:i + batch_size])
        feats.append(f)
        preds.append(model.head(f).argmax(1))
    return torch.cat(feats), torch.cat(preds)


def motion_feature_metrics(
    model: MotionClipClassifier, real: Tensor, fake: Tensor, fake_labels: Tensor | None = None,
    diversity_pairs: int = 300, multimodality_pairs: int = 20, seed: int = 0,
) -> dict[str, float]:
    """FID, diversity (real and fake), multimodality and accuracy of class-conditional samples on
    ``model``'s features. Keys are prefixed ``clip_classifier_`` where the number depends on the classifier
    beyond its features' geometry, to keep them from being read as the protocol's published metrics."""
    real_feats, _ = classifier_outputs(model, real)
    fake_feats, predicted = classifier_outputs(model, fake)
    out = {
        "clip_classifier_fid": frechet_distance(real_feats, fake_feats),
        "diversity_real": diversity(real_feats, diversity_pairs, seed),
        "diversity": diversity(fake_feats, diversity_pairs, seed),
    }
    if fake_labels is not None:
        fake_labels = fake_labels.long().to(predicted.device)
        out["multimodality"] = multimodality(fake_feats, fake_labels, multimodality_pairs, seed)
        out["clip_classifier_accuracy"] = float((predicted == fake_labels).float().mean())
    return out
