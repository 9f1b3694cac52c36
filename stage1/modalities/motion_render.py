"""Stick-figure animations of joint positions: a matplotlib 3-D view over a ground grid, written as GIF
(imageio + Pillow) or MP4 (OpenCV's MPEG-4 encoder, present offline through gym-pusht's opencv-python).

Positions are ``(T, J, 3)`` arrays or tensors in metres with ``up_axis`` up and the floor at ``floor``;
``parents[j]`` is the parent joint of ``j`` (-1 for the root), and each bone is drawn from a joint to its
parent. The camera follows the root horizontally (the ground grid stays put in the world, so the figure
is seen to travel over it) with a fixed height range, so sizes stay comparable between frames and panels.

:func:`render_stick_figure_gif` draws one sequence; :func:`render_stick_figure_grid` draws several panels
side by side, and a panel may overlay several sequences (e.g. an original in grey under its
reconstruction, :func:`render_comparison`). Every frame carries its frame number, which also keeps
Pillow from merging identical frames of a still pose (a GIF would then hold fewer frames than asked).
Files are written to a temporary name beside the target and renamed.
"""

from __future__ import annotations

import io
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from data.atomic import atomic_write

OVERLAY_COLOURS = ("0.55", "tab:blue", "tab:orange", "tab:green", "tab:red")
GRID_SPACING = 0.5  # metres between ground-grid lines


def _as_positions(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.detach().float().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x, dtype=np.float32)
    if a.ndim != 3 or a.shape[-1] != 3:
        raise ValueError(f"positions must be (T, J, 3), got {a.shape}")
    if not np.isfinite(a).all():
        raise ValueError("positions contain NaN or inf")
    return a


def _to_view(a: np.ndarray, up_axis: int) -> np.ndarray:
    """Reorder axes so matplotlib's z is ``up_axis``; the order is a cyclic shift, a rotation, so left
    stays left (swapping two axes would mirror the figure)."""
    if up_axis not in (0, 1, 2):
        raise ValueError(f"up_axis must be 0, 1 or 2, got {up_axis}")
    return a[..., [(up_axis + 1) % 3, (up_axis + 2) % 3, up_axis]]


def _view_radius(panels: list[list[np.ndarray]], root: int, floor: float) -> float:
    """Half the side of the view cube: room for the tallest pose and the widest spread about the root."""
    height = max(float(s[..., 2].max()) - floor for p in panels for s in p)
    spread = max(float(np.abs(s[..., :2] - s[:, root : root + 1, :2]).max()) for p in panels for s in p)
    return max(0.5, 0.55 * max(height, 2 * spread))


def _render_frames(
    panels: list[list[np.ndarray]], parents: Sequence[int], titles: Sequence[str] | None, cols: int | None,
    floor: float, root: int, radius: float | None, panel_size: float, dpi: int, elev: float, azim: float,
    colours: Sequence[str] | None = None, frame_step: int = 1,
) -> list[np.ndarray]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from mpl_toolkits.mplot3d.art3d import Line3DCollection, Poly3DCollection

    n = len(panels)
    cols = int(cols or int(np.ceil(np.sqrt(n))))
    rows = int(np.ceil(n / cols))
    frames_total = max(len(s) for p in panels for s in p)
    r = float(radius) if radius else _view_radius(panels, root, floor)
    bone_pairs = np.array([(j, int(p)) for j, p in enumerate(parents) if int(p) >= 0]).reshape(-1, 2)
    colours = list(colours or OVERLAY_COLOURS)

    fig = plt.figure(figsize=(panel_size * cols, panel_size * rows + 0.25), dpi=dpi)
    fig.subplots_adjust(left=0, right=1, bottom=0.02, top=0.95, wspace=0, hspace=0.05)
    counter = fig.text(0.01, 0.005, "", fontsize=7, color="0.3")
    scenes = []
    for i, seqs in enumerate(panels):
        ax = fig.add_subplot(rows, cols, i + 1, projection="3d")
        ax.view_init(elev=elev, azim=azim)
        ax.set_box_aspect((1, 1, 1), zoom=1.35)
        ax.set_axis_off()
        ax.computed_zorder = False  # mplot3d's depth sort would hide the grid under the plane
        if titles is not None and i < len(titles):
            ax.set_title(str(titles[i]), fontsize=8)
        plane = Poly3DCollection([np.zeros((4, 3))], facecolor="0.93", edgecolor="none", zorder=0)
        ax.add_collection3d(plane, autolim=False)
        # One collection per layer (not one artist per bone): drawing is what the time goes to.
        grid = Line3DCollection([], colors="0.7", linewidths=0.6, zorder=1)
        ax.add_collection3d(grid, autolim=False)
        first = 0 if len(seqs) > 1 else 1  # grey only underneath something else
        lines = []
        for k in range(len(seqs)):
            lines.append(Line3DCollection([], colors=colours[(first + k) % len(colours)], linewidths=2.0,
                                          zorder=2 + k, capstyle="round"))
            ax.add_collection3d(lines[-1], autolim=False)
        scenes.append((ax, plane, grid, lines, seqs))

    frames = []
    try:
        for t in range(0, frames_total, frame_step):
            for ax, plane, grid, lines, seqs in scenes:
                cx, cy = seqs[-1][min(t, len(seqs[-1]) - 1), root, :2]  # follow the last (front) sequence
                x0, x1, y0, y1 = cx - r, cx + r, cy - r, cy + r
                ax.set_xlim(x0, x1)
                ax.set_ylim(y0, y1)
                ax.set_zlim(floor, floor + 2 * r)
                plane.set_verts([[(x0, y0, floor), (x1, y0, floor), (x1, y1, floor), (x0, y1, floor)]])
                # Grid lines at world multiples of the spacing inside the view: they slide as the root moves.
                gx = np.arange(np.ceil(x0 / GRID_SPACING), np.floor(x1 / GRID_SPACING) + 1) * GRID_SPACING
                gy = np.arange(np.ceil(y0 / GRID_SPACING), np.floor(y1 / GRID_SPACING) + 1) * GRID_SPACING
                grid.set_segments([[(g, y0, floor), (g, y1, floor)] for g in gx]
                                  + [[(x0, g, floor), (x1, g, floor)] for g in gy])
                for seq, collection in zip(seqs, lines):
                    pose = seq[min(t, len(seq) - 1)]
                    collection.set_segments(pose[bone_pairs])
            counter.set_text(f"frame {t + 1}/{frames_total}")
            fig.canvas.draw()
            frames.append(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy())
    finally:
        plt.close(fig)
    return frames


def _write_gif(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    import imageio.v3 as iio

    buf = io.BytesIO()
    # GIF delays are whole centiseconds: 30 fps plays at 1/0.03 s = 33.3 fps.
    iio.imwrite(buf, np.stack(frames), extension=".gif", duration=1000.0 / fps, loop=0)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def _write_mp4(frames: list[np.ndarray], path: Path, fps: float) -> Path:
    try:
        import cv2
    except ImportError as err:
        raise RuntimeError("MP4 needs OpenCV (pip install opencv-python-headless); write a .gif instead") from err
    h, w = frames[0].shape[:2]
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".mp4", dir=path.parent)
    os.close(fd)
    try:
        writer = cv2.VideoWriter(tmp, cv2.VideoWriter_fourcc(*"mp4v"), float(fps), (w - w % 2, h - h % 2))
        if not writer.isOpened():
            raise RuntimeError("OpenCV has no MPEG-4 encoder here; write a .gif instead")
        for frame in frames:
            writer.write(np.ascontiguousarray(frame[: h - h % 2, : w - w % 2, ::-1]))  # RGB -> BGR
        writer.release()
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def render_stick_figure_grid(
    panels: Sequence[torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]],
    parents: Sequence[int],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    cols: int | None = None,
    fps: float = 30,
    up_axis: int = 1,
    floor: float = 0.0,
    root: int = 0,
    radius: float | None = None,
    panel_size: float = 2.4,
    dpi: int = 60,
    elev: float = 15.0,
    azim: float = -60.0,
    colours: Sequence[str] | None = None,
    frame_step: int = 1,
) -> Path:
    """Animate several panels in one file (``.gif`` or ``.mp4``, by suffix); returns the path.

    Each panel is a ``(T, J, 3)`` sequence or a list of them drawn over each other (in ``colours``: grey,
    blue, orange, ... by default). Shorter sequences hold their last pose. ``radius`` (metres, half the
    view cube) defaults to fit the tallest pose and widest stance of all panels. ``frame_step`` > 1 draws
    every k-th frame (played at ``fps / k``, so the motion keeps its speed): drawing a 3-D panel costs
    ~50 ms a frame on one CPU core.
    """
    path = Path(path)
    if path.suffix.lower() not in (".gif", ".mp4"):
        raise ValueError(f"stick-figure animations are written as .gif or .mp4, got {path.name}")
    if not panels:
        raise ValueError("nothing to render")
    if fps <= 0 or frame_step < 1:
        raise ValueError(f"fps must be positive and frame_step at least 1, got {fps}, {frame_step}")
    seqs = [[p] if isinstance(p, torch.Tensor | np.ndarray) else list(p) for p in panels]
    views = [[_to_view(_as_positions(s), up_axis) for s in p] for p in seqs]
    joints = {s.shape[1] for p in views for s in p}
    if joints != {len(parents)}:
        raise ValueError(f"parents names {len(parents)} joints but the positions have {sorted(joints)}")
    frames = _render_frames(views, parents, titles, cols, float(floor), int(root), radius, panel_size, dpi,
                            elev, azim, colours, int(frame_step))
    path.parent.mkdir(parents=True, exist_ok=True)
    rate = fps / frame_step
    return _write_gif(frames, path, rate) if path.suffix.lower() == ".gif" else _write_mp4(frames, path, rate)


def render_stick_figure_gif(
    positions: torch.Tensor | np.ndarray,
    parents: Sequence[int],
    path: str | os.PathLike,
    fps: float = 30,
    up_axis: int = 1,
    title: str | None = None,
    **kwargs,
) -> Path:
    """Animate one ``(T, J, 3)`` sequence as a stick figure over a ground grid (``.gif``; ``.mp4`` works too)."""
    kwargs.setdefault("dpi", 80)  # one panel: a little larger than a grid's panels (192 px square)
    return render_stick_figure_grid([positions], parents, path, titles=None if title is None else [title],
                                    fps=fps, up_axis=up_axis, **kwargs)


def render_comparison(
    originals: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray,
    reconstructions: Sequence[torch.Tensor | np.ndarray] | torch.Tensor | np.ndarray,
    parents: Sequence[int],
    path: str | os.PathLike,
    titles: Sequence[str] | None = None,
    **kwargs,
) -> Path:
    """One panel per pair: the original in grey with its reconstruction in blue over it, in step."""
    if len(originals) != len(reconstructions):
        raise ValueError(f"{len(originals)} originals but {len(reconstructions)} reconstructions")
    return render_stick_figure_grid([[a, b] for a, b in zip(originals, reconstructions)], parents, path,
                                    titles=titles, **kwargs)
