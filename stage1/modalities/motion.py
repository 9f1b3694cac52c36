"""The ``motion`` modality: humanoid motion windows ``(B, FEATURE_DIM, T)`` (``data.deepmimic``'s features:
heading-relative root velocities, root height and 6-D joint rotations; see :mod:`data.motion_features`).

* Loss (the tokenizer's ``perceptual`` slot, weighted by ``perceptual_weight``): joint positions and
  joint velocities through differentiable forward kinematics, both L1, in metres and metres per second
  (:class:`KinematicLoss`); the tokenizer's own ``rec_loss`` covers the features themselves.
* Files: one stick-figure GIF per sample (the first ``MAX_GIFS``; ``motion_render``'s 3-D view over a
  ground grid), ``samples.npz`` (features, joint positions, root positions and rotations, local joint
  rotations as wxyz quaternions, labels and class names), and ``motion.png``: side-view key frames of
  every sample, cheap enough for training callbacks.
* Metrics: MPJPE in metres (global, i.e. after integrating the root from the window start, and
  root-relative), joint velocity error in m/s and feature MSE for reconstructions; for samples the
  foot skating / ground penetration of ``metrics.motion`` and, with ``--classifier`` (a
  ``metrics.motion.MotionClipClassifier`` checkpoint), its FID / diversity / multimodality / accuracy,
  else a Fréchet distance on fixed kinematic statistics (named ``kinematic_fd``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torchmetrics import Metric

from data.atomic import atomic_write
from data.deepmimic import CLASS_NAMES, FOOT_JOINTS, FPS, JOINT_NAMES, PARENTS, UP_AXIS
from data.humanoid import ROTATED_JOINTS, load_skeleton
from data.motion_features import FEATURE_DIM, features_to_motion, features_to_positions
from data.rotations import matrix_to_quat
from stage1.modalities.base import Evaluator, FeatureSamples, Modality, save_figure_png

MAX_GIFS = 8  # GIFs cost seconds each (matplotlib 3-D); the .npz and motion.png hold every sample
MAX_PLOTTED = 16
KEY_FRAMES = 6


def positions_of(x: Tensor) -> Tensor:
    """Channel-first features ``(B, F, T)`` -> joint positions ``(B, T, J, 3)`` in metres."""
    return features_to_positions(x.transpose(-1, -2))


def joint_velocities(positions: Tensor, fps: float = FPS) -> Tensor:
    """``(..., T, J, 3)`` -> ``(..., T - 1, J, 3)`` finite-difference velocities in m/s."""
    return (positions[..., 1:, :, :] - positions[..., :-1, :, :]) * fps


class KinematicLoss(nn.Module):
    """``position_weight * mean|P_rec - P| + velocity_weight * mean|V_rec - V|`` over windows, frames,
    joints and axes, where ``P`` are FK joint positions (m) and ``V`` their finite-difference
    velocities (m/s). Positions integrate the root from the window start, so drift is penalised too."""

    def __init__(self, position_weight: float = 1.0, velocity_weight: float = 0.1) -> None:
        super().__init__()
        self.position_weight, self.velocity_weight = float(position_weight), float(velocity_weight)

    def forward(self, reconstruction: Tensor, target: Tensor) -> Tensor:
        p_rec = positions_of(reconstruction.float())
        with torch.no_grad():
            p = positions_of(target.float())
        loss = self.position_weight * (p_rec - p).abs().mean()
        if self.velocity_weight:
            loss = loss + self.velocity_weight * (joint_velocities(p_rec) - joint_velocities(p)).abs().mean()
        return loss


class MotionReconstructionMetric(Metric):
    """MPJPE (m; global and root-relative), joint velocity error (m/s) and feature MSE of reconstructions.

    ``update(preds, target)`` takes channel-first features; MPJPE is the mean Euclidean joint error over
    windows, frames and joints, the velocity error the mean Euclidean error of joint velocities.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        for name in ("global_err", "local_err", "vel_err", "feat_sq", "joints", "vel_joints", "feats"):
            self.add_state(name, torch.zeros((), dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, preds: Tensor, target: Tensor) -> None:
        p_rec, p = positions_of(preds.float()), positions_of(target.float())
        err = (p_rec - p).norm(dim=-1)
        local = ((p_rec - p_rec[..., :1, :]) - (p - p[..., :1, :])).norm(dim=-1)
        vel = (joint_velocities(p_rec) - joint_velocities(p)).norm(dim=-1)
        self.global_err += err.double().sum()
        self.local_err += local.double().sum()
        self.vel_err += vel.double().sum()
        self.joints += err.numel()
        self.vel_joints += vel.numel()
        self.feat_sq += (preds.double() - target.double()).pow(2).sum()
        self.feats += preds.numel()

    def compute(self) -> dict[str, Tensor]:
        joints, vel, feats = (v.clamp_min(1) for v in (self.joints, self.vel_joints, self.feats))
        return {"mpjpe_m": self.global_err / joints, "mpjpe_local_m": self.local_err / joints,
                "velocity_error_mps": self.vel_err / vel, "feature_mse": self.feat_sq / feats}


class MotionReconstruction(Evaluator):
    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.metric = MotionReconstructionMetric().to(options.get("device", "cpu"))
        self.notes = ["motion: mpjpe_m = mean joint position error in metres after integrating the root from the "
                      "window start; mpjpe_local_m = the same relative to the root joint; velocity_error_mps = mean "
                      f"joint velocity error in m/s at {FPS} fps; feature_mse on the [-1, 1] features"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        self.metric.update(fake, real)

    def compute(self) -> dict[str, Any]:
        return {k: float(v) for k, v in self.metric.compute().items()}


class KinematicStatistics(nn.Module):
    """Per window: mean and std over time of root-relative joint positions and of joint speeds (m, m/s),
    plus the root height's mean and std: a fixed feature map for a Fréchet distance without a classifier."""

    num_features = len(JOINT_NAMES) * 3 * 2 + len(JOINT_NAMES) * 2 + 2

    def forward(self, x: Tensor) -> Tensor:
        p = positions_of(x.float())
        local = (p - p[..., :1, :]).flatten(-2)
        speed = joint_velocities(p).norm(dim=-1)
        height = p[..., 0, UP_AXIS]
        return torch.cat((local.mean(1), local.std(1), speed.mean(1), speed.std(1), height.mean(1, keepdim=True),
                          height.std(1, keepdim=True)), -1).double()


class MotionSamples(Evaluator):
    """Samples vs real windows: physical plausibility of both (``metrics.motion``), and either the clip
    classifier's metrics (``options["classifier"]``) or ``kinematic_fd`` / template ``class_accuracy``."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        super().__init__()
        self.device = options.get("device", "cpu")
        self.classifier_path = options.get("classifier")
        self.real: list[Tensor] = []
        self.fake: list[Tensor] = []
        self.fake_labels: list[Tensor] = []
        self.fallback = None if self.classifier_path else FeatureSamples(
            KinematicStatistics(), "kinematic", "class_accuracy",
            "kinematic_fd: Fréchet distance of per-window kinematic statistics (root-relative joint positions and "
            "joint speeds, mean and std over time); class_accuracy: nearest class mean of those statistics (a "
            "template classifier, not a trained one)", device=self.device)
        ankle = load_skeleton().ankle_height
        self.floor, self.contact_height = 0.0, ankle + 0.02
        self.notes = [f"physical plausibility on FK joint positions: floor at y = 0 (the clips' ground), a foot in "
                      f"contact when its ankle joint is within {self.contact_height:.3f} m of the floor (the ankle "
                      f"sits {ankle:.3f} m above the sole); *_real: the same on the real windows"]

    def update(self, real: Tensor | None = None, fake: Tensor | None = None, labels: Tensor | None = None) -> None:
        if self.fallback is not None:
            self.fallback.update(real=real, fake=fake, labels=labels)
        if real is not None:
            self.real.append(real.float().cpu())
        if fake is not None:
            self.fake.append(fake.float().cpu())
            if labels is not None:
                self.fake_labels.append(labels.cpu())

    def compute(self) -> dict[str, Any]:
        from metrics import motion as motion_metrics

        results: dict[str, Any] = {}
        for prefix, batches in (("", self.fake), ("_real", self.real)):
            if batches:
                found = motion_metrics.physical_plausibility(positions_of(torch.cat(batches)), FOOT_JOINTS, FPS,
                                                             UP_AXIS, self.floor, self.contact_height)
                results |= {f"{k}{prefix}": v for k, v in found.items()}
        if self.fallback is not None:
            results |= self.fallback.compute()
            self.notes += self.fallback.notes
        elif self.real and self.fake:
            model = motion_metrics.MotionClipClassifier.load(self.classifier_path)
            labels = torch.cat(self.fake_labels) if self.fake_labels else None
            results |= motion_metrics.motion_feature_metrics(model, torch.cat(self.real), torch.cat(self.fake), labels)
            self.notes.append(f"clip_classifier_*: features of the clip classifier {self.classifier_path} "
                              "(trained on our own clip labels; not the HumanML3D evaluator)")
        return results


# ------------------------------------------------------------------------------------------------ files
def _keyframe_strips(rows: Sequence[Sequence[Tensor]], path: str | Path, titles: Sequence[str] | None = None,
                     frames: int = KEY_FRAMES) -> Path:
    """Side view (x forward at the window start, y up) of ``frames`` key frames per row; a row may overlay
    several sequences ``(T, J, 3)`` (grey first, then blue)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), frames, figsize=(1.3 * frames, 1.5 * len(rows)), squeeze=False)
    bones = [(j, p) for j, p in enumerate(PARENTS) if p >= 0]
    for r, seqs in enumerate(rows):
        length = min(len(s) for s in seqs)
        for k, t in enumerate(np.linspace(0, length - 1, frames).round().astype(int)):
            ax = axes[r, k]
            centre = float(seqs[-1][t, 0, 0])
            for i, seq in enumerate(seqs):
                pose = seq[t].float().cpu().numpy()
                colour = "0.6" if len(seqs) > 1 and i == 0 else "C0"
                for j, p in bones:
                    ax.plot(pose[[j, p], 0], pose[[j, p], UP_AXIS], color=colour, lw=1.5)
            ax.axhline(0.0, color="0.4", lw=0.8)
            ax.set_xlim(centre - 1.0, centre + 1.0)
            ax.set_ylim(-0.1, 1.9)
            ax.set_aspect("equal")
            ax.set_xticks([])
            ax.set_yticks([])
            if k == 0 and titles is not None:
                ax.set_ylabel(titles[r], fontsize=7)
            if r == 0:
                ax.set_title(f"frame {t}", fontsize=7)
    return save_figure_png(fig, path)


class MotionModality(Modality):
    name = "motion"
    datamodule = "data.deepmimic.MotionDataModule"

    def __init__(self, class_names: Sequence[str] = CLASS_NAMES, fps: int = FPS) -> None:
        self.class_names, self.fps = tuple(class_names), fps

    def for_spec(self, code_spec: Mapping[str, Any]) -> MotionModality:
        """Class names from the code spec's layout (a tokenizer trained on a subset of clips records them)."""
        names = (code_spec.get("layout") or {}).get("class_names")
        return MotionModality(names or self.class_names, self.fps)

    def _titles(self, labels: Tensor | None, n: int) -> list[str] | None:
        if labels is None:
            return None
        names = self.class_names
        return [names[int(c)] if 0 <= int(c) < len(names) else f"class {int(c)}" for c in labels[:n]]

    def perceptual_loss(self, options: Mapping[str, Any]) -> tuple[nn.Module, str]:
        loss = KinematicLoss(**dict(options))
        return loss, (f"joint positions (L1, m, weight {loss.position_weight}) and velocities (L1, m/s, weight "
                      f"{loss.velocity_weight}) through forward kinematics")

    def validation_metrics(self) -> Metric:
        return MotionReconstructionMetric()

    def save_reconstructions(self, x: Tensor, xrec: Tensor, path: str | Path) -> Path:
        n = min(len(x), MAX_PLOTTED // 2)
        originals, recons = positions_of(x[:n].float().cpu()), positions_of(xrec[:n].float().cpu())
        return _keyframe_strips([[a, b] for a, b in zip(originals, recons)], path)

    def save_preview(self, x: Tensor, path: str | Path, labels: Tensor | None = None) -> Path:
        n = min(len(x), MAX_PLOTTED)
        return _keyframe_strips([[p] for p in positions_of(x[:n].float().cpu())], path, self._titles(labels, n))

    def write_samples(self, x: Tensor, out: Path, labels: Tensor | None = None) -> list[Path]:
        """``motion.png`` (key frames of the first 16), ``sample_000_<class>.gif`` ... (the first ``MAX_GIFS``)
        and ``samples.npz``."""
        from stage1.modalities.motion_render import render_stick_figure_gif

        x = x.float().cpu()
        if x.dim() != 3 or x.shape[1] != FEATURE_DIM:
            raise ValueError(f"motion samples must be (N, {FEATURE_DIM}, T), got {tuple(x.shape)}")
        with torch.no_grad():
            features = x.transpose(1, 2)
            positions = features_to_positions(features)
            root_pos, root_rot, joint_rot = features_to_motion(features)
        titles = self._titles(labels, len(x)) or [None] * len(x)
        files = [self.save_preview(x, out / "motion.png", labels)]
        for i in range(min(len(x), MAX_GIFS)):
            name = f"sample_{i:03d}" + (f"_{titles[i]}" if titles[i] else "") + ".gif"
            files.append(render_stick_figure_gif(positions[i], PARENTS, out / name, fps=self.fps, up_axis=UP_AXIS,
                                                 title=titles[i]))
        arrays = {"features": x.numpy(), "positions": positions.numpy(), "root_position": root_pos.numpy(),
                  "root_rotation": matrix_to_quat(root_rot).numpy(),
                  "joint_rotations": matrix_to_quat(joint_rot).numpy(),
                  "joint_names": np.array(JOINT_NAMES), "parents": np.array(PARENTS),
                  "rotated_joints": np.array([JOINT_NAMES[j] for j in ROTATED_JOINTS]), "fps": np.array(self.fps)}
        if labels is not None:
            arrays |= {"labels": labels.cpu().numpy(), "class_names": np.array(self.class_names)}
        files.append(atomic_write(out / "samples.npz", lambda f: np.savez(f, **arrays)))
        return files

    def reconstruction_evaluator(self, options: Mapping[str, Any]) -> MotionReconstruction:
        return MotionReconstruction(options)

    def sample_evaluator(self, options: Mapping[str, Any]) -> MotionSamples:
        return MotionSamples(options)


MODALITY = MotionModality()
