"""Human motion (issue 19): the DeepMimic humanoid (URDF skeleton, FK, mirroring), 6-D rotations, the
heading-invariant window features, the window synthesizer and its cached DataModule, the ``motion``
modality's kinematic loss and metrics, and the path tokenizer -> codes -> prior -> stick-figure GIF."""

from __future__ import annotations

import json
import math
import re
import xml.etree.ElementTree as ET

import numpy as np
import pytest
import torch

from data import deepmimic
from data.deepmimic import (
    FOOT_JOINTS,
    JOINT_NAMES,
    PARENTS,
    UP_AXIS,
    MotionDataModule,
    WindowSynthesizer,
    features_to_positions,
    load_clip,
    motion_to_features,
    resample,
    synthesize_windows,
)
from data.humanoid import (
    MIRROR_JOINTS,
    ROTATED_JOINTS,
    URDF_RELPATH,
    forward_kinematics,
    mirror_pose,
    pybullet_data_root,
    rest_offsets,
)
from data.motion_features import FEATURE_DIM, HEIGHT_SCALE, heading_angles
from data.rotations import (
    matrix_to_6d,
    matrix_to_quat,
    quat_multiply,
    quat_normalize,
    quat_rotate,
    quat_slerp,
    quat_to_6d,
    quat_to_matrix,
    rotation_6d_to_matrix,
    rotation_6d_to_quat,
    yaw_quat,
)
from helpers import CONFIGS, train, train_and_tokenize
from stage1.modalities.motion import KinematicLoss, MotionReconstructionMetric, positions_of

SMALL_CLIPS = ("backflip", "walk", "kick")


def random_quats(*shape: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return quat_normalize(torch.randn(*shape, 4, generator=g, dtype=torch.float64))


def random_motion(frames: int = 5, seed: int = 0) -> deepmimic.Motion:
    g = torch.Generator().manual_seed(seed + 1)
    return deepmimic.Motion(torch.randn(frames, 3, generator=g, dtype=torch.float64), random_quats(frames, seed=seed),
                            random_quats(frames, len(ROTATED_JOINTS), seed=seed + 2))


# ---------------------------------------------------------------------------------------- rotations
def test_6d_rotation_round_trip_and_gram_schmidt_gives_rotations():
    q = random_quats(64)
    back = rotation_6d_to_quat(quat_to_6d(q))
    assert torch.allclose(back, torch.where(q[:, :1] < 0, -q, q), atol=1e-10)
    m = quat_to_matrix(q)
    assert torch.allclose(rotation_6d_to_matrix(matrix_to_6d(m)), m, atol=1e-12)
    assert torch.allclose(matrix_to_6d(m)[:, :3], m[:, :, 0]) and torch.allclose(matrix_to_6d(m)[:, 3:], m[:, :, 1])
    anything = rotation_6d_to_matrix(torch.randn(64, 6, dtype=torch.float64) * 3)  # a network's raw output
    eye = torch.eye(3, dtype=torch.float64).expand(64, 3, 3)
    assert torch.allclose(anything.transpose(-1, -2) @ anything, eye, atol=1e-10)
    assert torch.allclose(torch.linalg.det(anything), torch.ones(64, dtype=torch.float64), atol=1e-10)
    # quaternion algebra agrees with matrices: R(a b) = R(a) R(b), rotate(q, v) = R(q) v
    a, b = random_quats(8, seed=1), random_quats(8, seed=2)
    assert torch.allclose(quat_to_matrix(quat_multiply(a, b)), quat_to_matrix(a) @ quat_to_matrix(b), atol=1e-12)
    v = torch.randn(8, 3, dtype=torch.float64)
    assert torch.allclose(quat_rotate(a, v), (quat_to_matrix(a) @ v[..., None])[..., 0], atol=1e-12)
    assert torch.allclose(matrix_to_quat(quat_to_matrix(a)).abs(), a.abs(), atol=1e-10)


def test_slerp_hits_its_ends_takes_the_short_arc_and_keeps_constant_speed():
    q0, q1 = yaw_quat(torch.tensor(0.2, dtype=torch.float64)), yaw_quat(torch.tensor(1.4, dtype=torch.float64))
    assert torch.allclose(quat_slerp(q0, q1, 0.0), q0) and torch.allclose(quat_slerp(q0, q1, 1.0), q1)
    mid = quat_slerp(q0, -q1, torch.tensor(0.25, dtype=torch.float64))  # -q1 is the same rotation
    assert torch.allclose(mid, yaw_quat(torch.tensor(0.5, dtype=torch.float64)), atol=1e-12)


# ---------------------------------------------------------------------------------------- skeleton
def _urdf_origins() -> dict[str, tuple[str, list[float]]]:
    """Each joint's parent link and origin xyz, read straight from the URDF text (independently of data.humanoid)."""
    text = (pybullet_data_root() / URDF_RELPATH).read_bytes().rstrip(b"\x00").decode()
    out = {}
    for joint in ET.fromstring(text).iter("joint"):
        xyz = [float(v) for v in re.split(r"\s+", joint.find("origin").get("xyz").strip())]
        out[joint.get("name")] = (joint.find("parent").get("link"), xyz)
    return out


def test_fk_of_the_zero_pose_is_the_urdf_rest_skeleton():
    origins = _urdf_origins()
    identity = torch.eye(3, dtype=torch.float64)
    root = torch.tensor([0.3, 0.9, -0.2], dtype=torch.float64)
    pos = forward_kinematics(identity.expand(len(ROTATED_JOINTS), 3, 3), identity, root)
    assert pos.shape == (len(JOINT_NAMES), 3) and torch.allclose(pos[0], root)
    for j in range(1, len(JOINT_NAMES)):
        parent, xyz = origins[JOINT_NAMES[j]]
        assert parent == JOINT_NAMES[PARENTS[j]]
        expected = torch.tensor(xyz, dtype=torch.float64) * 0.25  # pybullet's DeepMimic env scale
        assert torch.allclose(pos[j] - pos[PARENTS[j]], expected, atol=1e-12), JOINT_NAMES[j]
    # a standing humanoid: the hips are 0.0849 m either side, ankles ~0.83 m below the root
    assert torch.allclose(rest_offsets()[3], torch.tensor([0.0, 0.0, 0.339548 * 0.25], dtype=torch.float64))
    assert pos[FOOT_JOINTS[0], UP_AXIS] == pytest.approx(0.9 - 0.25 * (1.686184 + 1.639480))


def test_fk_rotates_children_about_their_joint():
    """A 90-degree knee bend about +z swings the ankle from below the knee to behind it (-x)."""
    rots = torch.eye(3, dtype=torch.float64).repeat(len(ROTATED_JOINTS), 1, 1)
    knee = ROTATED_JOINTS.index(JOINT_NAMES.index("right_knee"))
    rots[knee] = quat_to_matrix(torch.tensor([math.cos(-math.pi / 4), 0, 0, math.sin(-math.pi / 4)],
                                             dtype=torch.float64))
    pos = forward_kinematics(rots, torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64))
    shin = pos[JOINT_NAMES.index("right_ankle")] - pos[JOINT_NAMES.index("right_knee")]
    assert torch.allclose(shin, torch.tensor([-0.409870, 0.0, 0.0], dtype=torch.float64), atol=1e-6)


def test_mirroring_twice_is_identity_and_mirrors_the_joint_positions():
    m = random_motion(6)
    once = mirror_pose(m.root_pos, m.root_quat, m.joint_quats)
    twice = mirror_pose(*once)
    for a, b in zip(twice, (m.root_pos, m.root_quat, m.joint_quats)):
        assert torch.equal(a, b)
    p, p_mirror = m.positions(), deepmimic.Motion(*once).positions()
    reflected = p[:, list(MIRROR_JOINTS)] * torch.tensor([1.0, 1.0, -1.0], dtype=torch.float64)
    assert torch.allclose(p_mirror, reflected, atol=1e-12)
    assert JOINT_NAMES[MIRROR_JOINTS[JOINT_NAMES.index("left_elbow")]] == "right_elbow"


# ---------------------------------------------------------------------------------------- clips and features
def test_clips_parse_and_resample_to_30_hz_through_their_key_frames():
    clip = load_clip("walk")
    assert len(clip.motion) == 39 and clip.loops and clip.times[-1] == pytest.approx(38 * 0.033332)
    at30 = resample(clip)
    assert len(at30) == math.floor(clip.times[-1] * 30 + 1e-9) + 1
    assert torch.allclose(at30.root_pos[0], clip.motion.root_pos[0])
    assert torch.allclose(at30.joint_quats[0].abs(), quat_normalize(clip.motion.joint_quats[0]).abs(), atol=1e-12)
    fast = resample(clip, speed=1.25)
    assert len(fast) == math.floor(clip.times[-1] * 30 / 1.25 + 1e-9) + 1
    kick = load_clip("kick")
    assert not kick.loops and kick.motion.joint_quats.shape == (47, 12, 4)


def _canonical_positions(m: deepmimic.Motion) -> torch.Tensor:
    """FK of the first T frames, moved so the root starts above the origin and turned to heading 0."""
    psi0 = heading_angles(m.root_quat)[0]
    p = m.positions()[:-1] - m.root_pos[0] * torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    return quat_rotate(yaw_quat(-psi0).expand(*p.shape[:-1], 4), p)


def test_windows_are_heading_and_translation_invariant_and_decode_to_their_poses():
    synth = WindowSynthesizer(24, clips=("cartwheel", "backflip", "spin"))
    for c in range(3):
        m = synth.window_of(c, np.random.default_rng(c))
        f = motion_to_features(m.root_pos, m.root_quat, m.joint_quats)
        assert f.shape == (24, FEATURE_DIM) and f.abs().max() <= 1.0
        for angle, shift in ((0.7, (3.0, 0.0, -1.0)), (-2.9, (-0.4, 0.0, 5.0))):
            moved = m.turned(angle)
            moved.root_pos = moved.root_pos + torch.tensor(shift, dtype=torch.float64)
            g = motion_to_features(moved.root_pos, moved.root_quat, moved.joint_quats)
            assert torch.allclose(f, g, atol=1e-9), synth.names[c]
        assert torch.allclose(features_to_positions(f), _canonical_positions(m), atol=1e-9)


def test_heading_stays_continuous_through_flips_and_cartwheels():
    for name in ("backflip", "cartwheel", "roll"):
        psi = heading_angles(resample(load_clip(name)).root_quat)
        assert psi.diff().abs().max() < 0.4, name  # rad per frame; a flip of the heading would be ~pi


def test_synthesis_is_deterministic_balanced_and_in_range():
    x, labels = synthesize_windows(6, window=16, seed=3, clips=SMALL_CLIPS)
    again, labels_again = synthesize_windows(6, window=16, seed=3, clips=SMALL_CLIPS)
    assert np.array_equal(x, again) and np.array_equal(labels, labels_again)
    assert x.shape == (6, 16, FEATURE_DIM) and x.dtype == np.float32 and np.abs(x).max() <= 1.0
    assert np.bincount(labels).tolist() == [2, 2, 2]
    other, _ = synthesize_windows(6, window=16, seed=4, clips=SMALL_CLIPS)
    assert not np.allclose(x, other)


def test_datamodule_batches_and_caches_by_parameters(tmp_path, monkeypatch):
    kwargs = dict(window=16, clips=list(SMALL_CLIPS), num_train=6, num_val=3, batch_size=4, cache_dir=str(tmp_path))
    dm = MotionDataModule(**kwargs)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    assert batch["x"].shape == (4, FEATURE_DIM, 16) and batch["label"].dtype == torch.long
    assert dm.num_classes == 3 and dm.class_names == SMALL_CLIPS and len(dm.split_dataset("val")) == 3
    assert len(list(tmp_path.glob("deepmimic-*.npy"))) == 2 and not list(tmp_path.glob(".*tmp"))

    def refuse(*args, **kw):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(deepmimic, "synthesize_windows", refuse)
    cached = MotionDataModule(**kwargs)
    cached.setup()
    assert torch.equal(cached.split_dataset("train").items, dm.split_dataset("train").items)
    with pytest.raises(AssertionError, match="cache"):  # another parameter, another cache entry
        MotionDataModule(**{**kwargs, "num_train": 7}).setup()
    with pytest.raises(ValueError, match="unknown DeepMimic clip"):
        MotionDataModule(clips=["moonwalk"])


# ---------------------------------------------------------------------------------------- losses and metrics
def _quaternion_fk_positions(x: torch.Tensor) -> torch.Tensor:
    """An independent FK for the loss test: quaternions chained with quat_rotate instead of matrices."""
    from data.motion_features import features_to_motion

    root_pos, root_rot, joint_rot = features_to_motion(x.transpose(1, 2))
    rq, jq = matrix_to_quat(root_rot), matrix_to_quat(joint_rot)
    offsets = rest_offsets().to(x)
    local = {j: jq[..., k, :] for k, j in enumerate(ROTATED_JOINTS)}
    rot, pos = [rq], [root_pos]
    for j in range(1, len(JOINT_NAMES)):
        p = PARENTS[j]
        pos.append(pos[p] + quat_rotate(rot[p], offsets[j].expand_as(pos[p])))
        rot.append(quat_multiply(rot[p], local[j]) if j in local else rot[p])
    return torch.stack(pos, -2)


def test_kinematic_loss_and_its_gradient_match_the_formula():
    x, _ = synthesize_windows(2, window=8, seed=0, clips=SMALL_CLIPS)
    target = torch.from_numpy(x).double().transpose(1, 2)
    recon = (target + 0.05 * torch.randn_like(target)).requires_grad_(True)
    loss = KinematicLoss(position_weight=1.0, velocity_weight=0.5)(recon, target)
    (grad,) = torch.autograd.grad(loss, recon)

    ref_recon = recon.detach().clone().requires_grad_(True)
    p_hat, p = _quaternion_fk_positions(ref_recon), _quaternion_fk_positions(target)
    v_hat, v = (p_hat[:, 1:] - p_hat[:, :-1]) * 30, (p[:, 1:] - p[:, :-1]) * 30
    expected = (p_hat - p).abs().mean() + 0.5 * (v_hat - v).abs().mean()
    (expected_grad,) = torch.autograd.grad(expected, ref_recon)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert torch.allclose(grad.double(), expected_grad, atol=1e-6)
    assert grad.abs().sum() > 0 and torch.isfinite(grad).all()


def test_reconstruction_metrics_are_zero_on_the_data_and_measure_a_height_shift_in_metres():
    x = torch.from_numpy(synthesize_windows(3, window=12, seed=1, clips=SMALL_CLIPS)[0]).transpose(1, 2)
    metric = MotionReconstructionMetric()
    metric.update(x, x)
    assert all(float(v) == pytest.approx(0.0, abs=1e-6) for v in metric.compute().values())
    lifted = x.clone()
    lifted[:, 3] += 0.03  # the root-height channel: every joint rises by 0.03 / HEIGHT_SCALE metres
    metric = MotionReconstructionMetric()
    metric.update(lifted, x)
    out = metric.compute()
    assert float(out["mpjpe_m"]) == pytest.approx(0.03 / HEIGHT_SCALE, rel=1e-4)
    assert float(out["mpjpe_local_m"]) == pytest.approx(0.0, abs=1e-5)
    assert float(out["velocity_error_mps"]) == pytest.approx(0.0, abs=1e-4)
    assert positions_of(x).shape == (3, 12, len(JOINT_NAMES), 3)


def test_sample_metrics_score_real_windows_as_a_perfect_generator(tmp_path):
    from metrics.motion import train_motion_classifier
    from stage1.modalities.motion import MotionSamples

    x, y = (torch.from_numpy(a) for a in synthesize_windows(12, window=16, seed=2, clips=SMALL_CLIPS))
    x = x.transpose(1, 2).contiguous()
    plain = MotionSamples({})
    plain.update(real=x, labels=y)
    plain.update(fake=x, labels=y)
    out = plain.compute()
    assert out["kinematic_fd"] < 1e-3 and out["class_accuracy"] >= 0.6  # a nearest-class-mean template
    assert out["foot_skating_ratio"] == pytest.approx(out["foot_skating_ratio_real"])
    assert out["ground_penetration"] >= 0 and 0 <= out["foot_contact_rate"] <= 1
    path = train_motion_classifier(x, y, num_classes=3, class_names=SMALL_CLIPS, epochs=2, width=16,
                                   num_features=16).save(tmp_path / "clf.pt")
    scored = MotionSamples({"classifier": str(path)})
    scored.update(real=x, labels=y)
    scored.update(fake=x, labels=y)
    out = scored.compute()
    assert out["clip_classifier_fid"] < 1e-3 and "multimodality" in out and "kinematic_fd" not in out


# ---------------------------------------------------------------------------------------- end to end
@pytest.fixture(scope="module")
def motion_tokenizer_and_codes(tmp_path_factory):
    return train_and_tokenize(tmp_path_factory.mktemp("motion"), "motion_vq", ["trainer.max_steps=12"],
                              batch_size=16)


def test_the_motion_tokenizer_records_its_spec_and_evaluates_in_metres(motion_tokenizer_and_codes, tmp_path):
    from stage1 import load_tokenizer
    from tokenforge.evaluate import main as evaluate

    ckpt, codes = motion_tokenizer_and_codes
    spec = load_tokenizer(ckpt).code_spec
    assert spec["modality"] == "motion" and spec["grid"] == [8]
    assert spec["layout"]["class_names"] == ["backflip", "walk", "crawl"]
    manifest = json.loads((codes / "manifest.json").read_text())
    assert manifest["num_classes"] == 3 and manifest["sample_shape"] == [8]
    res = evaluate([str(ckpt), "--out", str(tmp_path / "ev")])
    for key in ("mpjpe_m", "mpjpe_local_m", "velocity_error_mps", "usage", "perplexity"):
        assert key in res, key
    assert 0 < res["mpjpe_m"] < 5


@pytest.mark.parametrize("prior,flags", [("motion_ar", ["--top-k", "8"]), ("motion_maskgit", ["--steps", "3"])])
def test_class_conditional_priors_sample_stick_figure_gifs(prior, flags, motion_tokenizer_and_codes, tmp_path):
    from PIL import Image

    from tokenforge.sample import main as sample

    _, codes = motion_tokenizer_and_codes
    train(CONFIGS / "smoke" / f"{prior}.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=6",
                                                          "trainer.val_check_interval=6"])
    ckpt = tmp_path / prior / "checkpoints" / "last.ckpt"
    out = sample([str(ckpt), "-n", "1", "--class", "backflip", "--out", str(tmp_path / "s"), *flags])
    gifs = sorted(out.glob("sample_*.gif"))
    assert [g.name for g in gifs] == ["sample_000_backflip.gif"]
    assert Image.open(gifs[0]).n_frames == 32  # one frame per motion frame of the 32-frame window
    with np.load(out / "samples.npz") as f:
        assert f["positions"].shape == (1, 32, len(JOINT_NAMES), 3) and f["labels"].tolist() == [0]
        assert f["joint_rotations"].shape == (1, 32, len(ROTATED_JOINTS), 4)
        assert f["class_names"].tolist()[0] == "backflip"
    assert (out / "motion.png").is_file() and np.load(out / "codes.npy").shape == (1, 8)
    if prior == "motion_ar":  # the modality's sample metrics through evaluate
        from tokenforge.evaluate import main as evaluate

        res = evaluate([str(ckpt), "--num-samples", "6", "--out", str(tmp_path / "ev"), *flags])
        for key in ("kinematic_fd", "class_accuracy", "foot_skating_ratio", "foot_skating_ratio_real",
                    "ground_penetration"):
            assert key in res, key


def test_maskgit_inbetweening_keeps_the_first_and_last_codes(motion_tokenizer_and_codes, tmp_path):
    """sample.py --infill real codes --keep the first and last code: the middle is generated, the ends stay."""
    from tokenforge.sample import main as sample

    _, codes = motion_tokenizer_and_codes
    train(CONFIGS / "smoke" / "motion_maskgit.yaml", tmp_path, [f"data.params.codes={codes}", "trainer.max_steps=4",
                                                               "trainer.val_check_interval=4"])
    ckpt = tmp_path / "motion_maskgit" / "checkpoints" / "last.ckpt"
    real_file = codes / "val-00000.npy"
    real = np.load(real_file).astype(np.int64)[:2]
    out = sample([str(ckpt), "-n", "2", "--class", "walk", "crawl", "--infill", str(real_file), "--keep", "0:1,7:8",
                  "--steps", "3", "--out", str(tmp_path / "between")])
    filled = np.load(out / "codes.npy")
    assert filled.shape == (2, 8) and np.array_equal(filled[:, [0, -1]], real[:, [0, -1]])
    assert json.loads((out / "samples.json").read_text())["sampling"]["keep"] == "0:1,7:8"
    with np.load(out / "samples.npz") as f:
        assert f["positions"].shape == (2, 32, len(JOINT_NAMES), 3) and f["labels"].tolist() == [1, 2]
