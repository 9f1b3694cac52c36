"""Rotation helpers for motion data (torch, any batch shape, differentiable where it matters).

Quaternions are ``(..., 4)`` in ``w, x, y, z`` order (the DeepMimic files' order). The continuous
6-D representation is Zhou et al. 2019 ("On the Continuity of Rotation Representations in Neural
Networks"): the first two COLUMNS of the rotation matrix, ``[R[:, 0], R[:, 1]]``, mapped back by
Gram-Schmidt, so any 6 numbers (a network's output) give a valid rotation.
"""

from __future__ import annotations

import torch
from torch import Tensor


def quat_normalize(q: Tensor, eps: float = 1e-12) -> Tensor:
    return q / q.norm(dim=-1, keepdim=True).clamp_min(eps)


def quat_conjugate(q: Tensor) -> Tensor:
    return q * q.new_tensor([1.0, -1.0, -1.0, -1.0])


def quat_multiply(a: Tensor, b: Tensor) -> Tensor:
    """Hamilton product ``a * b`` (apply ``b`` first, then ``a``)."""
    aw, ax, ay, az = a.unbind(-1)
    bw, bx, by, bz = b.unbind(-1)
    return torch.stack((aw * bw - ax * bx - ay * by - az * bz,
                        aw * bx + ax * bw + ay * bz - az * by,
                        aw * by - ax * bz + ay * bw + az * bx,
                        aw * bz + ax * by - ay * bx + az * bw), dim=-1)


def quat_to_matrix(q: Tensor) -> Tensor:
    """``(..., 4)`` unit quaternions -> ``(..., 3, 3)`` rotation matrices (normalised first)."""
    w, x, y, z = quat_normalize(q).unbind(-1)
    rows = (1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
            2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
            2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y))
    return torch.stack(rows, dim=-1).reshape(*q.shape[:-1], 3, 3)


def matrix_to_quat(m: Tensor) -> Tensor:
    """``(..., 3, 3)`` rotation matrices -> unit quaternions with ``w >= 0`` (Shepperd's branch choice:
    solve from the largest of ``w, x, y, z`` so no division by a small number)."""
    m00, m01, m02 = m[..., 0, 0], m[..., 0, 1], m[..., 0, 2]
    m10, m11, m12 = m[..., 1, 0], m[..., 1, 1], m[..., 1, 2]
    m20, m21, m22 = m[..., 2, 0], m[..., 2, 1], m[..., 2, 2]
    candidates = torch.stack((
        torch.stack((1 + m00 + m11 + m22, m21 - m12, m02 - m20, m10 - m01), -1),
        torch.stack((m21 - m12, 1 + m00 - m11 - m22, m01 + m10, m02 + m20), -1),
        torch.stack((m02 - m20, m01 + m10, 1 - m00 + m11 - m22, m12 + m21), -1),
        torch.stack((m10 - m01, m02 + m20, m12 + m21, 1 - m00 - m11 + m22), -1)), dim=-2)  # (..., 4, 4)
    diag = torch.stack((candidates[..., 0, 0], candidates[..., 1, 1], candidates[..., 2, 2],
                        candidates[..., 3, 3]), -1)
    best = diag.argmax(-1, keepdim=True)
    q = torch.gather(candidates, -2, best[..., None].expand(*best.shape[:-1], 1, 4)).squeeze(-2)
    q = quat_normalize(q)
    return torch.where(q[..., :1] < 0, -q, q)


def quat_rotate(q: Tensor, v: Tensor) -> Tensor:
    """Rotate vectors ``(..., 3)`` by unit quaternions ``(..., 4)``."""
    w, u = q[..., :1], q[..., 1:]
    t = 2 * torch.cross(u, v, dim=-1)
    return v + w * t + torch.cross(u, t, dim=-1)


def quat_slerp(q0: Tensor, q1: Tensor, t: Tensor | float) -> Tensor:
    """Spherical linear interpolation along the shorter arc; ``t`` broadcasts against ``q[..., :1]``."""
    t = torch.as_tensor(t, dtype=q0.dtype, device=q0.device)
    if t.dim() == q0.dim() - 1:
        t = t[..., None]
    dot = (q0 * q1).sum(-1, keepdim=True)
    q1 = torch.where(dot < 0, -q1, q1)
    dot = dot.abs().clamp(max=1.0)
    theta = torch.acos(dot)
    sin = torch.sin(theta)
    near = sin < 1e-6  # nearly the same rotation: linear interpolation is exact enough and stable
    safe = torch.where(near, torch.ones_like(sin), sin)
    w0 = torch.where(near, 1 - t, torch.sin((1 - t) * theta) / safe)
    w1 = torch.where(near, t, torch.sin(t * theta) / safe)
    return quat_normalize(w0 * q0 + w1 * q1)


def axis_angle_to_quat(axis: Tensor, angle: Tensor) -> Tensor:
    """Unit ``axis`` ``(..., 3)`` (broadcast) and ``angle`` ``(...)`` in radians -> quaternions."""
    half = angle[..., None] / 2
    return torch.cat((torch.cos(half), torch.sin(half) * axis), dim=-1)


def yaw_quat(angle: Tensor) -> Tensor:
    """Rotations about the y (up) axis by ``angle`` radians."""
    return axis_angle_to_quat(angle.new_tensor([0.0, 1.0, 0.0]), angle)


def matrix_to_6d(m: Tensor) -> Tensor:
    """``(..., 3, 3)`` -> ``(..., 6)``: the first column, then the second (Zhou et al. 2019)."""
    return torch.cat((m[..., :, 0], m[..., :, 1]), dim=-1)


def rotation_6d_to_matrix(d6: Tensor, eps: float = 1e-8) -> Tensor:
    """``(..., 6)`` -> ``(..., 3, 3)`` by Gram-Schmidt: any input gives a rotation matrix."""
    a1, a2 = d6[..., :3], d6[..., 3:]
    b1 = a1 / a1.norm(dim=-1, keepdim=True).clamp_min(eps)
    a2 = a2 - (b1 * a2).sum(-1, keepdim=True) * b1
    b2 = a2 / a2.norm(dim=-1, keepdim=True).clamp_min(eps)
    b3 = torch.cross(b1, b2, dim=-1)
    return torch.stack((b1, b2, b3), dim=-1)


def quat_to_6d(q: Tensor) -> Tensor:
    return matrix_to_6d(quat_to_matrix(q))


def rotation_6d_to_quat(d6: Tensor) -> Tensor:
    return matrix_to_quat(rotation_6d_to_matrix(d6))


def wrap_angle(a: Tensor) -> Tensor:
    """Angles mapped into ``[-pi, pi)``."""
    return torch.remainder(a + torch.pi, 2 * torch.pi) - torch.pi
