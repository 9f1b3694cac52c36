"""The window representation of humanoid motion (what a motion tokenizer sees) and its way back to
joint positions.

Per frame ``t`` of a window (HumanML3D's root convention, with 6-D rotations for the pose):

=========  ===========================================================================================
channels   meaning
=========  ===========================================================================================
0          root yaw velocity ``psi[t+1] - psi[t]`` (rad/frame) times ``YAW_SCALE``
1, 2       root horizontal velocity ``p[t+1] - p[t]`` in the heading frame of ``t`` (forward x,
           right z; m/frame) times ``VELOCITY_SCALE``
3          root height (m) times ``HEIGHT_SCALE``
4..9       root rotation with the heading removed, ``R_y(-psi[t]) R_root[t]``, as 6-D (Zhou et al.)
10..81     the 12 local joint rotations (``ROTATED_JOINTS`` order) as 6-D
=========  ===========================================================================================

Only velocities relative to the heading enter, so a window does not change when its source is
moved on the ground or turned about the vertical (the heading invariance the tests check). The
fixed scales put every channel in about [-1, 1] (6-D entries are there by construction), which is
the range the tokenizers and ``sample`` clamp to; they are constants, not data statistics, so
features mean the same thing in every checkpoint.

The heading ``psi`` must stay continuous through backflips, cartwheels and rolls, where no
per-frame heading is (every yaw-equivariant heading of a single rotation is singular somewhere), so
it is tracked along the window (:func:`heading_angles`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from data.humanoid import ROTATED_JOINTS, forward_kinematics
from data.rotations import (
    matrix_to_6d,
    quat_conjugate,
    quat_multiply,
    quat_normalize,
    quat_to_matrix,
    rotation_6d_to_matrix,
    wrap_angle,
    yaw_quat,
)

FPS = 30
YAW_SCALE = 2.0  # rad/frame -> feature: 1.0 is 15 rad/s (quick turns in dance_a and spinkick reach ~10 rad/s)
VELOCITY_SCALE = 5.0  # m/frame -> feature: 1.0 is 6 m/s (the run clip moves at ~3.6 m/s)
HEIGHT_SCALE = 0.75  # metres -> feature; the root stays within about [0.1, 1.2] m
HEADING_PULL = 0.2  # per frame, towards the swing-twist heading (see heading_angles)
NUM_ROTATED = len(ROTATED_JOINTS)
ROOT_CHANNELS = 4
FEATURE_DIM = ROOT_CHANNELS + 6 + 6 * NUM_ROTATED  # 82


def heading_angles(root_quat: Tensor, pull: float = HEADING_PULL) -> Tensor:
    """``(..., T, 4)`` root quaternions -> ``(..., T)`` continuous heading angles about +y (radians).

    ``psi`` is such that ``R_y(psi)`` turns +x (the rest pose's forward) into the heading direction.
    Frame 0 takes the swing-twist heading ``2 atan2(q_y, q_w)``; later frames add the twist about +y
    of the step rotation ``q_t q_{t-1}^*`` (zero for a flip or cartwheel about a horizontal axis, the
    full turn for a spin) and move ``pull * (q_w^2 + q_y^2)`` of the way towards the swing-twist
    heading, whose reliability ``q_w^2 + q_y^2`` is 1 upright and 0 upside down (where no heading is
    defined). Every step is yaw-equivariant, so turning the source turns ``psi`` by the same angle.
    """
    q = quat_normalize(root_quat.double())
    own = 2 * torch.atan2(q[..., 2], q[..., 0])
    trust = q[..., 0] ** 2 + q[..., 2] ** 2
    step = quat_multiply(q[..., 1:, :], quat_conjugate(q[..., :-1, :]))
    step = torch.where(step[..., :1] < 0, -step, step)
    twist = 2 * torch.atan2(step[..., 2], step[..., 0])
    psi = [own[..., 0]]
    for t in range(1, q.shape[-2]):
        guess = psi[-1] + twist[..., t - 1]
        psi.append(guess + pull * trust[..., t] * wrap_angle(own[..., t] - guess))
    return torch.stack(psi, -1).to(root_quat.dtype)


def _rotate_about_y(v: Tensor, psi: Tensor) -> Tensor:
    """Horizontal vectors ``(..., 2)`` as (x, z) turned by ``R_y(psi)``."""
    c, s = torch.cos(psi), torch.sin(psi)
    return torch.stack((c * v[..., 0] + s * v[..., 1], -s * v[..., 0] + c * v[..., 1]), -1)


def motion_to_features(root_pos: Tensor, root_quat: Tensor, joint_quats: Tensor) -> Tensor:
    """``T + 1`` frames (``(..., T+1, 3)``, ``(..., T+1, 4)``, ``(..., T+1, 12, 4)``, quaternions wxyz)
    -> ``(..., T, FEATURE_DIM)`` features (the last frame only supplies the final velocities)."""
    psi = heading_angles(root_quat)
    step = root_pos[..., 1:, [0, 2]] - root_pos[..., :-1, [0, 2]]
    velocity = _rotate_about_y(step, -psi[..., :-1])
    yaw_rate = wrap_angle(psi[..., 1:] - psi[..., :-1])
    root_local = quat_multiply(yaw_quat(-psi[..., :-1]), root_quat[..., :-1, :])
    root = torch.cat((yaw_rate[..., None] * YAW_SCALE, velocity * VELOCITY_SCALE,
                      root_pos[..., :-1, 1:2] * HEIGHT_SCALE), -1)
    rot6 = matrix_to_6d(quat_to_matrix(torch.cat((root_local[..., None, :], joint_quats[..., :-1, :, :]), -2)))
    return torch.cat((root, rot6.flatten(-2)), -1)


def features_to_motion(features: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(..., T, F)`` -> ``(root position (..., T, 3), root rotation (..., T, 3, 3), joint rotations
    (..., T, 12, 3, 3))``: the root path is integrated from the velocities, starting at the origin
    facing +x (heading 0); differentiable."""
    if features.shape[-1] != FEATURE_DIM:
        raise ValueError(f"motion features have {FEATURE_DIM} channels per frame, got {features.shape[-1]}")
    yaw_rate = features[..., 0] / YAW_SCALE
    velocity = features[..., 1:3] / VELOCITY_SCALE
    height = features[..., 3] / HEIGHT_SCALE
    # heading and position at t accumulate the steps before t (frame 0: heading 0 at the origin)
    psi = torch.cumsum(yaw_rate, -1) - yaw_rate
    steps = _rotate_about_y(velocity, psi)
    xz = torch.cumsum(steps, -2) - steps
    root_pos = torch.stack((xz[..., 0], height, xz[..., 1]), -1)
    c, s = torch.cos(psi), torch.sin(psi)
    zero, one = torch.zeros_like(c), torch.ones_like(c)
    yaw = torch.stack((c, zero, s, zero, one, zero, -s, zero, c), -1).reshape(*psi.shape, 3, 3)
    rotations = rotation_6d_to_matrix(features[..., ROOT_CHANNELS:].unflatten(-1, (1 + NUM_ROTATED, 6)))
    return root_pos, yaw @ rotations[..., 0, :, :], rotations[..., 1:, :, :]


def features_to_positions(features: Tensor) -> Tensor:
    """``(..., T, F)`` window features -> ``(..., T, J, 3)`` joint positions in metres (y up), the
    window starting at the origin facing +x; differentiable."""
    root_pos, root_rot, joint_rot = features_to_motion(features)
    return forward_kinematics(joint_rot, root_rot, root_pos)
