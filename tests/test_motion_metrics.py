"""Motion metrics (foot skating, ground penetration, clip-classifier FID / diversity / multimodality /
accuracy) and the stick-figure renderer, on synthetic skeletons (no dataset needed)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from metrics.motion import (
    MotionClipClassifier,
    classifier_accuracy,
    diversity,
    foot_contact_speed,
    foot_skating_ratio,
    frechet_distance,
    ground_penetration,
    motion_feature_metrics,
    multimodality,
    physical_plausibility,
    train_motion_classifier,
)
from stage1.modalities.motion_render import render_comparison, render_stick_figure_gif, render_stick_figure_grid

# A 7-joint biped, y up: root, right hip/foot, left hip/foot, head, hand.
PARENTS = [-1, 0, 1, 0, 3, 0, 5]
FEET = (2, 4)
REST = torch.tensor([[0, 1.0, 0], [0.1, 0.6, 0], [0.1, 0.02, 0], [-0.1, 0.6, 0], [-0.1, 0.02, 0],
                     [0, 1.5, 0], [0.3, 1.3, 0]])
FPS = 30


def _walk(frames: int = 30, root_speed: float = 1.0) -> torch.Tensor:
    """The rest pose carried along x at ``root_speed`` m/s: every joint moves, feet included."""
    x = torch.arange(frames) / FPS * root_speed
    pos = REST.expand(frames, -1, -1).clone()
    pos[..., 0] += x[:, None]
    return pos


def _reference_skating_ratio(pos: np.ndarray, feet, fps, h=0.05, v=0.5, window=5) -> float:
    """GMD's formula written directly with scipy (one sequence, y up)."""
    from scipy.ndimage import uniform_filter1d

    f = pos[:, feet, :]
    speed = np.linalg.norm(f[1:, :, [0, 2]] - f[:-1, :, [0, 2]], axis=-1) * fps  # (T-1, 2)
    avg = uniform_filter1d(speed, axis=0, size=window, mode="constant", origin=0)
    contact = (f[:-1, :, 1] < h) & (f[1:, :, 1] < h)
    return float((contact & (speed > v) & (avg > v)).any(axis=1).mean())


def test_a_planted_foot_does_not_skate_and_a_sliding_one_does():
    pos = _walk()
    planted = pos.clone()
    planted[:, FEET[0], 0] = 0.1  # the right foot stays put on the floor while the body moves
    planted[:, FEET[1], 1] = 0.3  # the left foot swings in the air: not in contact, never skating
    assert float(foot_skating_ratio(planted, FEET, FPS)) == 0.0
    speed, count = foot_contact_speed(planted, FEET, FPS)
    assert speed == 0.0 and count == len(pos) - 1
    # Both feet on the floor, carried at 1 m/s (> 0.5 m/s, also after the zero-padded 5-step mean at the ends).
    assert float(foot_skating_ratio(pos, FEET, FPS)) == 1.0
    assert foot_contact_speed(pos, FEET, FPS)[0] == pytest.approx(1.0, abs=1e-4)
    # Sliding slowly (0.3 m/s) is under the speed threshold: contact speed > 0, skating ratio 0.
    slow = _walk(root_speed=0.3)
    assert float(foot_skating_ratio(slow, FEET, FPS)) == 0.0 and foot_contact_speed(slow, FEET, FPS)[0] > 0.29


def test_skating_ratio_matches_gmd_formula_on_random_motion():
    gen = torch.Generator().manual_seed(0)
    for scale in (0.01, 0.015, 0.02, 0.03):  # per-step speeds around the 0.5 m/s threshold: the window matters
        pos = _walk(40, root_speed=0.0)
        pos[:, list(FEET)] += torch.randn(40, 2, 3, generator=gen) * scale  # feet jitter and lift
        expected = _reference_skating_ratio(pos.numpy(), list(FEET), FPS)
        assert float(foot_skating_ratio(pos, FEET, FPS)) == pytest.approx(expected, abs=1e-6)
    batch = torch.stack([_walk(), _walk(root_speed=0.0)])
    assert foot_skating_ratio(batch, FEET, FPS).tolist() == [1.0, 0.0]


def test_skating_respects_up_axis_floor_and_contact_height():
    pos = _walk()
    z_up = pos[..., [0, 2, 1]]  # the same motion with z up
    assert float(foot_skating_ratio(z_up, FEET, FPS, up_axis=2)) == 1.0
    bouncing = _walk(root_speed=0.0)
    bouncing[:, list(FEET), 1] = 0.01 + 0.03 * (torch.arange(30) % 2)[:, None]  # fast, but only vertical
    assert float(foot_skating_ratio(bouncing, FEET, FPS)) == 0.0
    assert float(foot_skating_ratio(bouncing[..., [0, 2, 1]], FEET, FPS, up_axis=2)) == 0.0
    raised = pos + torch.tensor([0.0, 0.5, 0.0])
    assert float(foot_skating_ratio(raised, FEET, FPS)) == 0.0  # feet 52 cm up: not in contact
    assert float(foot_skating_ratio(raised, FEET, FPS, floor=0.5)) == 1.0
    assert float(foot_skating_ratio(pos, FEET, FPS, contact_height=0.01)) == 0.0


def test_ground_penetration_is_zero_above_the_floor_and_the_depth_below():
    pos = _walk(10)
    assert float(ground_penetration(pos)) == 0.0
    sunk = pos - torch.tensor([0.0, 0.05, 0.0])  # lowest joints (feet) at -3 cm
    assert float(ground_penetration(sunk)) == pytest.approx(0.03, abs=1e-6)
    half = pos.clone()
    half[:5, FEET[0], 1] = -0.1  # one foot 10 cm under the floor in half the frames
    assert float(ground_penetration(half)) == pytest.approx(0.05, abs=1e-6)
    assert float(ground_penetration(sunk, floor=-0.5)) == 0.0
    out = physical_plausibility(torch.stack([pos, sunk]), FEET, FPS)
    assert out["ground_penetration"] == pytest.approx(0.015, abs=1e-6) and out["foot_contact_rate"] == 1.0


def test_frechet_distance_is_zero_for_a_set_with_itself_and_grows_with_a_shift():
    gen = torch.Generator().manual_seed(1)
    feats = torch.randn(500, 8, generator=gen, dtype=torch.float64)
    assert frechet_distance(feats, feats) == pytest.approx(0.0, abs=1e-6)
    shifts = [frechet_distance(feats, feats + d) for d in (0.1, 0.5, 1.0)]
    # Equal covariances: FD = |mean shift|^2 = 8 d^2.
    assert shifts == pytest.approx([8 * 0.01, 8 * 0.25, 8 * 1.0], rel=1e-4)
    # A wider spread (same mean): (sqrt(s1) - sqrt(s2))^2 per dimension for isotropic covariances.
    assert frechet_distance(feats, 2 * feats) == pytest.approx(8.0 * float(feats.var(0).mean()), rel=0.05)


def test_diversity_and_multimodality_follow_their_definitions():
    same = torch.ones(50, 4)
    assert diversity(same) == 0.0
    two = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    # Pairs of two random permutations of {a, b}: each pair is (a, a), (a, b), ... -> distance 0 or 5.
    assert diversity(two, num_pairs=2, seed=3) in (0.0, 2.5, 5.0)
    gen = torch.Generator().manual_seed(0)
    feats = torch.randn(400, 16, generator=gen)
    # E|x - y| for independent N(0, I_16): sqrt(2) * E|N(0, I_16)| ~ sqrt(2 * 16) * (1 - 1/(4*16)).
    assert diversity(feats, num_pairs=300) == pytest.approx((32 ** 0.5) * (1 - 1 / 64), rel=0.05)
    labels = torch.arange(4).repeat_interleave(10)
    class_means = torch.arange(4).float()[:, None].expand(4, 3) * 10
    per_class_copies = class_means[labels]  # all samples of a class identical, classes far apart
    assert multimodality(per_class_copies, labels) == 0.0 and diversity(per_class_copies) > 5.0
    noisy = per_class_copies + torch.randn(40, 3, generator=gen)
    assert 0.5 < multimodality(noisy, labels) < 5.0


def _class_windows(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Feature windows (n, 6, 32): class c oscillates channel c at frequency c + 1, plus noise."""
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 3
    t = torch.arange(32) / 32
    x = 0.3 * torch.randn(n, 6, 32, generator=gen)
    phase = torch.rand(n, generator=gen)[:, None] * 6.28
    x[torch.arange(n), y] += torch.sin(2 * torch.pi * (y[:, None] + 1) * t + phase)
    return x, y


def test_clip_classifier_learns_round_trips_and_scores_conditional_samples(tmp_path):
    torch.set_num_threads(1)
    x, y = _class_windows(192, 0)
    vx, vy = _class_windows(96, 1)
    model = train_motion_classifier(x, y, class_names=["a", "b", "c"], epochs=8, width=16, num_features=16)
    assert classifier_accuracy(model, vx, vy) > 0.9
    path = model.save(tmp_path / "clf.pt", val_accuracy=0.95)
    loaded = MotionClipClassifier.load(path)
    assert loaded.class_names == ["a", "b", "c"] and loaded.val_accuracy == 0.95
    torch.testing.assert_close(loaded(vx), model(vx))
    same = motion_feature_metrics(loaded, vx, vx, fake_labels=vy)
    assert same["clip_classifier_fid"] == pytest.approx(0.0, abs=1e-4) and same["clip_classifier_accuracy"] > 0.9
    assert same["diversity"] == pytest.approx(same["diversity_real"])
    wrong = motion_feature_metrics(loaded, vx, vx, fake_labels=(vy + 1) % 3)
    assert wrong["clip_classifier_accuracy"] < 0.1
    noise = motion_feature_metrics(loaded, vx, torch.randn_like(vx), fake_labels=vy)
    assert noise["clip_classifier_fid"] > 10 * max(same["clip_classifier_fid"], 1e-3)


def test_clip_classifier_is_not_thrown_by_small_deviations_in_channels_constant_in_the_data():
    # Channel 5 never varies in the training windows (like the fixed 6-D entries of a 1-DoF knee); a sample
    # a few hundredths off there is still the same motion. A near-zero std would blow that up to chance.
    torch.set_num_threads(1)
    x, y = _class_windows(192, 0)
    vx, vy = _class_windows(96, 1)
    x[:, 5], vx[:, 5] = 1.0, 1.0
    model = train_motion_classifier(x, y, epochs=8, width=16, num_features=16)
    assert float(model.std[5]) >= 0.2 * float(x.std(dim=(0, 2)).median()) - 1e-6
    shifted = vx.clone()
    shifted[:, 5] += 0.05 * torch.randn(shifted[:, 5].shape, generator=torch.Generator().manual_seed(2))
    assert classifier_accuracy(model, vx, vy) > 0.9 and classifier_accuracy(model, shifted, vy) > 0.9


def test_gif_has_one_frame_per_pose_even_for_a_still_pose(tmp_path):
    import imageio.v3 as iio

    still = REST.expand(7, -1, -1)
    path = render_stick_figure_gif(still.numpy(), PARENTS, tmp_path / "still.gif", fps=30, title="still", dpi=40)
    frames = iio.imread(path, index=None)
    assert frames.shape[0] == 7 and frames.shape[-1] == 3
    assert iio.immeta(path, index=0)["duration"] in (30, 40)  # ms, GIF delays are whole centiseconds
    walk = _walk(9)
    grid = render_stick_figure_grid([walk, walk[:5], [walk, walk + 0.05]], PARENTS, tmp_path / "grid.gif", dpi=40)
    assert iio.imread(grid, index=None).shape[0] == 9  # the longest panel; shorter ones hold their last pose
    cmp_path = render_comparison([walk, walk], [walk + 0.02, walk], PARENTS, tmp_path / "cmp.gif", dpi=40)
    assert iio.imread(cmp_path, index=None).shape[0] == 9
    halved = render_stick_figure_gif(walk, PARENTS, tmp_path / "halved.gif", fps=30, frame_step=2, dpi=40)
    assert iio.imread(halved, index=None).shape[0] == 5 and iio.immeta(halved, index=0)["duration"] in (60, 70)
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_mp4_has_one_frame_per_pose(tmp_path):
    cv2 = pytest.importorskip("cv2")
    path = render_stick_figure_gif(_walk(6), PARENTS, tmp_path / "walk.mp4", dpi=40)
    assert int(cv2.VideoCapture(str(path)).get(cv2.CAP_PROP_FRAME_COUNT)) == 6


def test_the_renderer_module_is_not_listed_as_a_modality():
    from stage1.modalities import available

    assert "motion" in available() and "motion_render" not in available()


def test_renderer_rejects_mismatched_inputs(tmp_path):
    walk = _walk(4)
    with pytest.raises(ValueError, match="joints"):
        render_stick_figure_gif(walk, PARENTS[:-1], tmp_path / "x.gif")
    with pytest.raises(ValueError, match="gif or .mp4"):
        render_stick_figure_gif(walk, PARENTS, tmp_path / "x.png")
    with pytest.raises(ValueError, match="reconstructions"):
        render_comparison([walk], [], PARENTS, tmp_path / "x.gif")
    with pytest.raises(ValueError, match=r"\(T, J, 3\)"):
        render_stick_figure_gif(walk[0], PARENTS, tmp_path / "x.gif")
    assert not list(tmp_path.iterdir())
