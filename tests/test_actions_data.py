"""Actions data (issue 20): chunks and histories, the scripted experts, rollouts, the cache, the BC baseline."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data import actions as A
from data.actions import (
    ActionChunkDataModule,
    Normalizer,
    chunk_actions,
    history_windows,
    load_demonstrations,
    make_expert,
    rollout,
    unchunk,
    write_rollout_gif,
)


def test_chunks_round_trip_and_pad_with_the_last_action():
    a = np.random.default_rng(0).normal(size=(13, 2)).astype(np.float32)
    c = chunk_actions(a, 5)
    assert c.shape == (13, 5, 2)
    np.testing.assert_array_equal(c[3], a[3:8])
    np.testing.assert_array_equal(c[11], np.stack([a[11], a[12], a[12], a[12], a[12]]))
    np.testing.assert_array_equal(unchunk(c), a)
    np.testing.assert_array_equal(unchunk(c[::5], stride=5, length=len(a)), a)  # non-overlapping chunks
    np.testing.assert_array_equal(unchunk(c[::2], stride=2, length=len(a)), a)
    with pytest.raises(ValueError):
        unchunk(c, stride=6)


def test_temporal_ensemble_averages_what_the_last_chunks_predicted_for_this_step():
    """Official VQ-BeT execution: query every step; act with the mean of the k predictions for now."""
    calls = []

    def policy(obs_history):  # call t predicts 100 * t + (t + j) for step t + j
        t = len(calls)
        calls.append(obs_history)
        return np.array([[100.0 * t + t + j] for j in range(4)])

    ens = A.TemporalEnsemble(policy, k=3)
    acted = [float(ens(np.zeros((1, 1)))[0, 0]) for _ in range(5)]
    # step 0: 0; step 1: mean(1, 101); step 2: mean(2, 102, 202); then the oldest chunk drops out
    assert acted == pytest.approx([0, 51, 102, 203, 304])
    ens.reset(0)
    assert float(ens(np.zeros((1, 1)))[0, 0]) == pytest.approx(505)  # no chunk from before the reset
    with pytest.raises(ValueError, match="at least 5"):
        A.TemporalEnsemble(policy, k=5)(np.zeros((1, 1)))
    [result] = rollout(A.TemporalEnsemble(lambda h: np.zeros((5, 1)), k=5), "mountain_car", [0], max_steps=7)
    assert result.steps == 7  # one action per query: the wrapped policy is asked at every step


def test_history_windows_end_at_each_step_and_repeat_the_first_observation():
    obs = np.arange(10, dtype=np.float32).reshape(5, 2)
    w = history_windows(obs, 3)
    assert w.shape == (5, 3, 2)
    np.testing.assert_array_equal(w[0], obs[[0, 0, 0]])
    np.testing.assert_array_equal(w[1], obs[[0, 0, 1]])
    np.testing.assert_array_equal(w[4], obs[[2, 3, 4]])
    np.testing.assert_array_equal(history_windows(obs, 1)[:, 0], obs)


def test_mountain_car_expert_solves_every_episode_in_both_modes(tmp_path):
    demos = load_demonstrations("mountain_car", 40, seed=0, cache_dir=tmp_path, progress=False)
    assert demos.success.all(), f"failed episodes: {np.flatnonzero(~demos.success)}"
    assert set(demos.modes.tolist()) == {0, 1}  # both first-push directions occur
    assert (demos.obs_dim, demos.act_dim) == (2, 1) and len(demos) == 40
    from data.mountain_car import classify_mode

    # the trajectory alone tells the mode the expert drew (what rollouts of any policy are scored by)
    assert [classify_mode(o, a) for o, a in zip(demos.observations, demos.actions)] == demos.modes.tolist()
    # the slowest and fastest pumping both reach the flag from the extreme start positions
    from data import mountain_car as mc

    for k in (mc.K_MIN, mc.K_MAX):
        for first in (-1.0, 1.0):
            for start in (-0.6, -0.4):
                env = mc.make_env()
                env.reset(seed=0)
                env.unwrapped.state = np.array([start, 0.0])
                push, done, steps = first, False, 0
                while not done:
                    obs, _, terminated, truncated, _ = env.step(np.array([k * push], np.float32))
                    push = float(np.sign(obs[1])) or push
                    done, steps = terminated or truncated, steps + 1
                assert terminated, (k, first, start, steps)


@pytest.mark.parametrize("env_name", ["mountain_car", "pusht"])
def test_a_random_policy_rollout_runs_to_termination_and_writes_a_gif(env_name, tmp_path):
    info = A.env_info(env_name)
    rng = np.random.default_rng(0)
    low, high = (-1.0, 1.0) if env_name == "mountain_car" else (100.0, 400.0)

    def policy(obs_history):
        assert obs_history.shape == (3, info.obs_dim)
        return rng.uniform(low, high, size=(4, info.act_dim)).astype(np.float32)

    [res] = rollout(policy, env_name, seeds=[7], max_steps=6, history=3, record=True, execute=2)
    assert res.steps == 6 and res.actions.shape == (6, info.act_dim) and res.observations.shape == (6, info.obs_dim)
    assert not res.success and res.steps_to_goal is None
    assert (res.final_coverage is not None) == (env_name == "pusht")
    assert len(res.frames) == 7  # the start plus one per step
    path = write_rollout_gif(res.frames, tmp_path / "roll.gif")
    import imageio.v2 as imageio

    frames = imageio.mimread(path)
    # GIF writers merge identical consecutive frames (a car that has barely moved)
    assert 2 <= len(frames) <= 7 and max(frames[0].shape[:2]) <= 192
    assert not list(tmp_path.glob(".*.tmp"))


def test_the_demonstration_cache_is_keyed_and_written_atomically(tmp_path, monkeypatch):
    first = load_demonstrations("mountain_car", 3, seed=1, cache_dir=tmp_path, progress=False)
    assert len(list(tmp_path.glob("actions-mountain_car-*.npz"))) == 1
    assert not list(tmp_path.glob(".*.tmp"))
    calls = []
    real = A._generate
    monkeypatch.setattr(A, "_generate", lambda *a: calls.append(a) or real(*a))
    again = load_demonstrations("mountain_car", 3, seed=1, cache_dir=tmp_path, progress=False)
    assert not calls  # read back, not regenerated
    for x, y in zip(first.actions, again.actions):
        np.testing.assert_array_equal(x, y)
    other = load_demonstrations("mountain_car", 3, seed=2, cache_dir=tmp_path, progress=False)
    load_demonstrations("mountain_car", 4, seed=1, cache_dir=tmp_path, progress=False)
    assert len(calls) == 2 and len(list(tmp_path.glob("actions-mountain_car-*.npz"))) == 3
    assert not np.array_equal(other.seeds, first.seeds)
    # a damaged file is rebuilt rather than trusted
    path = A.demonstrations_path("mountain_car", 3, 1, tmp_path)
    path.write_bytes(b"not an npz")
    rebuilt = load_demonstrations("mountain_car", 3, seed=1, cache_dir=tmp_path, progress=False)
    assert len(calls) == 3
    np.testing.assert_array_equal(rebuilt.actions[0], first.actions[0])

    from data import atomic

    def write_then_die(path, write):  # the process dies after the bytes are written, before the rename
        def write_and_interrupt(f):
            write(f)
            raise KeyboardInterrupt

        return atomic.atomic_write(path, write_and_interrupt)

    monkeypatch.setattr(A, "atomic_write", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        load_demonstrations("mountain_car", 5, seed=1, cache_dir=tmp_path, progress=False)
    assert not A.demonstrations_path("mountain_car", 5, 1, tmp_path).exists()  # no half file
    assert not list(tmp_path.glob(".*.tmp"))


def test_datamodule_splits_by_episode_and_exposes_its_normalisation(tmp_path):
    dm = ActionChunkDataModule("mountain_car", num_episodes=10, seed=0, history=2, chunk=4, batch_size=16,
                               cache_dir=str(tmp_path), progress=False)
    dm.setup()
    train, val = dm.episodes["train"], dm.episodes["val"]
    assert len(val) == 1 and not set(train) & set(val) and len(train) + len(val) == 10
    lengths = dm.demos.lengths
    assert len(dm.split_dataset("train")) == lengths[train].sum() and len(dm.split_dataset("val")) == lengths[val].sum()
    batch = next(iter(dm.train_dataloader()))
    assert batch["obs"].shape == (16, 2, 2) and batch["actions"].shape == (16, 4, 1)
    all_train = dm.split_dataset("train").actions
    assert all_train.min() == pytest.approx(-1.0) and all_train.max() == pytest.approx(1.0)  # minmax
    # the first training item is episode train[0]'s first step: history padded, chunk from step 0
    ep = train[0]
    item = dm.split_dataset("train")[0]
    raw_obs = dm.normalizer.normalize_obs(dm.demos.observations[ep][[0, 0]])
    np.testing.assert_allclose(item["obs"].numpy(), raw_obs, rtol=1e-6)
    stats = dm.stats["actions"]
    np.testing.assert_allclose(item["actions"].numpy() * stats["std"] + stats["mean"], dm.demos.actions[ep][:4],
                               rtol=1e-5, atol=1e-6)


def test_normalizer_round_trips_numpy_and_torch():
    rng = np.random.default_rng(0)
    obs, act = rng.normal(3, 2, size=(50, 3)), rng.uniform(0, 512, size=(50, 2))
    obs[:, 2] = 1.0  # a constant feature keeps scale 1
    for kind in ("minmax", "standard"):
        n = Normalizer.fit(obs, act, kind)
        assert n.obs_scale[2] == 1.0
        z = n.normalize_actions(act)
        np.testing.assert_allclose(n.unnormalize_actions(z), act, rtol=1e-5)
        t = n.unnormalize_actions(torch.as_tensor(z, dtype=torch.float32))
        assert torch.is_tensor(t) and np.allclose(t.numpy(), act, rtol=1e-4)
        if kind == "minmax":
            assert z.min() == pytest.approx(-1) and z.max() == pytest.approx(1)
        back = Normalizer.from_state(n.state())
        np.testing.assert_array_equal(back.action_scale, n.action_scale)


def test_pusht_push_simulator_predicts_the_real_env():
    """The expert's scratch world (built from gym-pusht's constructors, its PD step, no contact
    callback) gives the same block motion as the env for the same targets."""
    from data.pusht import make_env
    from data.pusht_expert import PushSimulator, _rotate, contact_candidates

    env = make_env()
    obs, _ = env.reset(seed=3)
    base = env.unwrapped
    block, angle = np.array(base.block.position), float(base.block.angle)
    starts, directions = contact_candidates()
    start = block + _rotate(starts[5:6], angle)[0]
    direction = _rotate(directions[5:6], angle)[0]
    targets = start + direction * 10.0 * np.arange(1, 5)[:, None]
    predicted, predicted_angle = PushSimulator().push(start, block, angle, targets)
    base.agent.position, base.agent.velocity = tuple(start), (0.0, 0.0)
    for t in targets:
        env.step(t)
    moved = np.linalg.norm(np.array(base.block.position) - block)
    assert moved > 5.0  # the push moved the block
    np.testing.assert_allclose(np.array(base.block.position), predicted, atol=0.5)
    assert abs(base.block.angle - predicted_angle) < 0.01


def test_pusht_modes_are_read_from_the_agents_turn_around_the_block():
    from data.pusht import block_cog, classify_mode

    features = np.array([0, 0, 256, 256, 0, 1], np.float32)  # block at the centre, angle 0
    cog = block_cog(features)
    t = np.linspace(0, 1.5 * np.pi, 40)
    obs = np.tile(features, (40, 1))
    obs[:, :2] = cog + 120 * np.stack([np.cos(t), np.sin(t)], 1)
    assert classify_mode(obs, None) == 1  # the angle increases: clockwise on screen (y down)
    obs[:, 1] = cog[1] - 120 * np.sin(t)
    assert classify_mode(obs, None) == 0
    obs[:, :2] = cog + 120 * np.stack([np.cos(t / 10), np.sin(t / 10)], 1)
    assert classify_mode(obs, None) == -1  # less than a quarter turn: neither


def test_pusht_expert_draws_both_orbit_directions_from_one_start():
    expert = make_expert("pusht")
    modes = set()
    for seed in range(8):
        expert.reset(seed)
        modes.add(expert.mode)
    assert modes == {0, 1}
    # one planned cycle is a walk around the block in the drawn direction, then a push
    from data.pusht import make_env, winding

    env = make_env()
    obs, _ = env.reset(seed=11)
    turns = {}
    for mode in (0, 1):
        expert.reset(0)
        expert.mode = mode
        path = np.array(expert.plan(obs.astype(np.float64)))
        feats = np.tile(obs, (len(path), 1))
        feats[:, :2] = path
        turns[mode] = winding(feats)
    assert turns[0] <= 0 <= turns[1]


def test_bc_mlp_learns_a_chunk_and_returns_actions_in_env_units(tmp_path, one_thread):
    import pytorch_lightning as pl

    from stage2.bc_mlp import BCMLP

    dm = ActionChunkDataModule("mountain_car", num_episodes=6, seed=0, history=2, chunk=4, batch_size=64,
                               cache_dir=str(tmp_path), progress=False)
    model = BCMLP("mountain_car", history=2, chunk=4, hidden=32, depth=2, lr=3e-3, max_steps=60)
    trainer = pl.Trainer(max_steps=60, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                         enable_model_summary=False, accelerator="cpu", limit_val_batches=0)
    dm.setup()
    batch = next(iter(dm.train_dataloader()))
    before = torch.nn.functional.mse_loss(model(batch["obs"]), batch["actions"]).item()
    trainer.fit(model, datamodule=dm)
    after = torch.nn.functional.mse_loss(model(batch["obs"]), batch["actions"]).item()
    assert after < 0.5 * before
    np.testing.assert_allclose(model.action_mean.numpy(), dm.stats["actions"]["mean"])  # copied at fit start
    chunk = model.policy(dm.demos.observations[0][:2])
    assert chunk.shape == (4, 1) and chunk.dtype == np.float32 and np.all(np.abs(chunk) <= 1.5)
    path = tmp_path / "bc.ckpt"
    trainer.save_checkpoint(path)
    loaded = BCMLP.load(path)
    np.testing.assert_allclose(loaded.policy(dm.demos.observations[0][:2]), chunk, rtol=1e-5)
    [res] = rollout(loaded.policy, "mountain_car", seeds=[5], max_steps=20, history=2)
    assert res.steps == 20
