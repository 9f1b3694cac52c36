"""The DeepMimic humanoid: its skeleton (read from ``pybullet_data/humanoid/humanoid.urdf``), forward
kinematics in torch, and left/right mirroring.

Frames: y is up (``UP_AXIS = 1``), the humanoid faces +x and its right side is +z in its rest pose,
as in DeepMimic. Every joint frame is its parent's translated by the URDF joint origin (all ``rpy``
are zero), so a pose is a root position, a root rotation and one local rotation per rotating joint;
the wrists are fixed joints (end points of the forearms). Units are metres: pybullet's DeepMimic
environment loads this URDF with ``globalScaling=0.25`` (``pybullet_envs/deep_mimic/env/
humanoid_stable_pd.py``), which is the scale the motion clips' root positions are in.

``JOINT_NAMES`` / ``PARENTS`` follow the URDF's link order (pybullet's link indices), which is also
the order of the rotations in a DeepMimic motion frame (``ROTATED_JOINTS``).
"""

from __future__ import annotations

import functools
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from data.errors import MissingDataError
from data.rotations import rotation_6d_to_matrix

URDF_RELPATH = "humanoid/humanoid.urdf"
URDF_SCALE = 0.25  # pybullet's DeepMimic env: loadURDF("humanoid/humanoid.urdf", globalScaling=0.25)

JOINT_NAMES: tuple[str, ...] = (
    "root", "chest", "neck",
    "right_hip", "right_knee", "right_ankle", "right_shoulder", "right_elbow", "right_wrist",
    "left_hip", "left_knee", "left_ankle", "left_shoulder", "left_elbow", "left_wrist",
)
PARENTS: tuple[int, ...] = (-1, 0, 1, 0, 3, 4, 1, 6, 7, 0, 9, 10, 1, 12, 13)
FOOT_JOINTS: tuple[int, int] = (JOINT_NAMES.index("right_ankle"), JOINT_NAMES.index("left_ankle"))
UP_AXIS = 1
# Joints with a local rotation in a motion frame, in the file's order (knees and elbows are 1-DoF).
ROTATED_JOINTS: tuple[int, ...] = tuple(JOINT_NAMES.index(n) for n in (
    "chest", "neck", "right_hip", "right_knee", "right_ankle", "right_shoulder", "right_elbow",
    "left_hip", "left_knee", "left_ankle", "left_shoulder", "left_elbow"))
REVOLUTE_JOINTS: tuple[str, ...] = ("right_knee", "right_elbow", "left_knee", "left_elbow")


def _mirror_index(names: tuple[str, ...]) -> tuple[int, ...]:
    swap = {"right_": "left_", "left_": "right_"}
    out = []
    for n in names:
        side = next((s for s in swap if n.startswith(s)), None)
        out.append(names.index(swap[side] + n[len(side):]) if side else names.index(n))
    return tuple(out)


MIRROR_JOINTS = _mirror_index(JOINT_NAMES)  # position j of a mirrored pose comes from joint MIRROR_JOINTS[j]
MIRROR_ROTATED = _mirror_index(tuple(JOINT_NAMES[j] for j in ROTATED_JOINTS))  # the same over ROTATED_JOINTS


def pybullet_data_root() -> Path:
    """The install folder of ``pybullet_data`` (the ``pybullet`` wheel ships it)."""
    try:
        import pybullet_data
    except ImportError as err:
        raise MissingDataError("the DeepMimic humanoid and clips ship in the pybullet wheel: pip install pybullet "
                               "(or set data.params.root to a folder holding humanoid/ and data/motions/)") from err
    return Path(pybullet_data.getDataPath())


@dataclass(frozen=True)
class Skeleton:
    """Joint offsets from the parent joint (metres, ``(J, 3)``, in the parent's frame), the rotation
    axis of each revolute joint (by name), and the rest height of the ankle joints above the soles."""

    offsets: Tensor
    revolute_axes: dict[str, tuple[float, float, float]]
    ankle_height: float


def _floats(text: str | None) -> list[float]:
    return [float(v) for v in (text or "0 0 0").split()]


@functools.lru_cache(maxsize=4)
def load_skeleton(root: str | None = None) -> Skeleton:
    """Parse the humanoid URDF under ``root`` (default: the installed ``pybullet_data``)."""
    path = Path(root or pybullet_data_root()) / URDF_RELPATH
    if not path.is_file():
        raise MissingDataError(f"{path} not found: the DeepMimic humanoid ships in the pybullet wheel "
                               "(pip install pybullet) or set data.params.root to a copy of pybullet_data")
    # The shipped file ends in a NUL byte, which XML parsers refuse: drop trailing NULs first.
    tree = ET.fromstring(path.read_bytes().rstrip(b"\x00"))
    joints = {j.get("name"): j for j in tree.iter("joint")}
    offsets = torch.zeros(len(JOINT_NAMES), 3, dtype=torch.float64)
    for i, name in enumerate(JOINT_NAMES):
        joint = joints[name]
        if i == 0:
            continue
        parent = joint.find("parent").get("link")
        if parent != JOINT_NAMES[PARENTS[i]]:
            raise ValueError(f"{path}: joint {name}'s parent is {parent}, expected {JOINT_NAMES[PARENTS[i]]}")
        origin = joint.find("origin")
        if any(abs(v) > 1e-9 for v in _floats(origin.get("rpy"))):
            raise ValueError(f"{path}: joint {name} has a rotated origin; this FK assumes translated frames")
        offsets[i] = torch.tensor(_floats(origin.get("xyz")), dtype=torch.float64) * URDF_SCALE
    axes = {n: tuple(_floats(joints[n].find("axis").get("xyz"))) for n in REVOLUTE_JOINTS}
    # The foot is the ankle link's collision box: the sole is its lowest face.
    foot = next(link for link in tree.iter("link") if link.get("name") == "right_ankle").find("collision")
    box_y = _floats(foot.find("origin").get("xyz"))[1]
    half_height = _floats(foot.find("geometry/box").get("size"))[1] / 2
    return Skeleton(offsets, axes, -(box_y - half_height) * URDF_SCALE)


def rest_offsets(root: str | None = None) -> Tensor:
    """``(J, 3)`` float64 joint offsets (metres) of the humanoid."""
    return load_skeleton(root).offsets


def forward_kinematics(joint_rotations: Tensor, root_rotation: Tensor, root_position: Tensor,
                       offsets: Tensor | None = None) -> Tensor:
    """Joint positions ``(..., J, 3)`` of poses given as rotation matrices (differentiable).

    ``joint_rotations``: ``(..., len(ROTATED_JOINTS), 3, 3)`` local rotations in ``ROTATED_JOINTS``
    order; ``root_rotation``: ``(..., 3, 3)`` world rotation of the root; ``root_position``:
    ``(..., 3)``; ``offsets``: ``(J, 3)`` (default: the URDF's). Use :func:`rotation_6d_to_matrix`
    for 6-D inputs (:func:`forward_kinematics_6d`).
    """
    offsets = (rest_offsets() if offsets is None else offsets).to(root_position)
    local = [None] * len(JOINT_NAMES)
    for k, j in enumerate(ROTATED_JOINTS):
        local[j] = joint_rotations[..., k, :, :]
    rot: list[Tensor] = [root_rotation]
    pos: list[Tensor] = [root_position]
    for j in range(1, len(JOINT_NAMES)):
        p = PARENTS[j]
        pos.append(pos[p] + (rot[p] @ offsets[j].unsqueeze(-1)).squeeze(-1))
        rot.append(rot[p] if local[j] is None else rot[p] @ local[j])
    return torch.stack(pos, dim=-2)


def forward_kinematics_6d(joint_rotations_6d: Tensor, root_rotation_6d: Tensor, root_position: Tensor,
                          offsets: Tensor | None = None) -> Tensor:
    """:func:`forward_kinematics` for 6-D rotations: ``(..., 12, 6)``, ``(..., 6)``, ``(..., 3)``."""
    return forward_kinematics(rotation_6d_to_matrix(joint_rotations_6d), rotation_6d_to_matrix(root_rotation_6d),
                              root_position, offsets)


# Reflection through the humanoid's sagittal plane (z -> -z). A rotation R becomes M R M with
# M = diag(1, 1, -1); for a quaternion (w, x, y, z) that is (w, -x, -y, z).
_REFLECT_QUAT = (1.0, -1.0, -1.0, 1.0)


def mirror_pose(root_position: Tensor, root_quat: Tensor, joint_quats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Left/right mirror of poses ``(..., 3)``, ``(..., 4)``, ``(..., 12, 4)`` (wxyz): reflect z in the
    world and swap the sides' joints. Its FK is the reflected FK with sides swapped; twice is identity."""
    flip = root_quat.new_tensor(_REFLECT_QUAT)
    return (root_position * root_position.new_tensor([1.0, 1.0, -1.0]), root_quat * flip,
            joint_quats[..., list(MIRROR_ROTATED), :] * flip)


def revolute_quats(angles: Tensor, names: tuple[str, ...] = REVOLUTE_JOINTS, root: str | None = None) -> Tensor:
    """``(..., len(names))`` joint angles -> quaternions ``(..., len(names), 4)`` about each joint's URDF axis."""
    axes = angles.new_tensor([load_skeleton(root).revolute_axes[n] for n in names])
    half = angles[..., None] / 2
    return torch.cat((torch.cos(half), torch.sin(half) * axes), dim=-1)


__all__ = ["FOOT_JOINTS", "JOINT_NAMES", "MIRROR_JOINTS", "PARENTS", "ROTATED_JOINTS", "UP_AXIS", "Skeleton",
           "forward_kinematics", "forward_kinematics_6d", "load_skeleton", "mirror_pose",
           "rest_offsets", "revolute_quats"]
