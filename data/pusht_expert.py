"""A scripted, stochastic, multimodal PushT expert (no demonstrations ship with gym-pusht).

Each cycle: (1) *plan* — from each of ~32 contact points spread along the T's outline, simulate a
short straight push (two lengths) in a scratch copy of the env's own pymunk world (same bodies,
PD gains and 10 physics substeps per env step), and score it by how much it reduces the pose error
(mean distance of the T's 8 corners to their goal positions), less a small charge per pixel of
walking; pick one push by a softmax over the scores; (2) *walk* to the push's start point: out to a
circle of radius ``ORBIT_RADIUS`` around the block, along it in the episode's direction
(clockwise or counter-clockwise, drawn at :meth:`reset`: the two modes), and straight in;
(3) *push* — the same target sequence that was simulated. Then plan again.

The block is quasi-static in this env (the space's damping is 0, so it stops as soon as it is not
pushed), which is why a push simulated from the observed pose predicts the real one well.
Observations are the feature vectors of ``data/pusht.py``; every call returns one action ``(1, 2)``.
"""

from __future__ import annotations

import numpy as np

EXPERT_VERSION = 1  # bump when the behaviour changes: it keys the demonstrations cache

AGENT_RADIUS = 15.0
ORBIT_RADIUS = 110.0  # the T reaches 77 px from its centre of gravity, the agent 15 more
WALK_STEP = 18.0  # px of path per env step while walking
SETTLE_STEPS = 3  # env steps holding the start point so the agent is nearly at rest when the push starts
PUSHES = ((3, 6.0), (5, 12.0))  # (env steps, px the target advances per step): a nudge and a shove
NUM_CONTACTS = 32
GOAL_POSE = np.array([256.0, 256.0, np.pi / 4])  # gym-pusht's fixed goal
COG_LOCAL = np.array([0.0, 45.0])
WALK_COST = 0.01  # score penalty per px walked: prefers near pushes among equally good ones
TEMPERATURE = 0.2  # softmax temperature as a fraction of the best score (floor 0.2 px)

# The T in its body frame (gym-pusht's add_tee with scale 30), counter-clockwise.
T_OUTLINE = np.array([(-60, 0), (60, 0), (60, 30), (15, 30), (15, 120), (-15, 120), (-15, 30), (-60, 30)], float)
T_CORNERS = np.array([(-60, 30), (60, 30), (60, 0), (-60, 0), (-15, 30), (-15, 120), (15, 120), (15, 30)], float)


def _rotate(v: np.ndarray, angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return v @ np.array([[c, s], [-s, c]])


def pose_error(position: np.ndarray, angle: float) -> float:
    """Mean distance (px) of the T's corners to where they are at the goal."""
    here = position + _rotate(T_CORNERS, angle)
    goal = GOAL_POSE[:2] + _rotate(T_CORNERS, GOAL_POSE[2])
    return float(np.linalg.norm(here - goal, axis=1).mean())


def contact_candidates(num: int = NUM_CONTACTS) -> tuple[np.ndarray, np.ndarray]:
    """Push start points (agent centres) and push directions in the body frame, ``(k, 2)`` each.

    Points are spread evenly along the outline; each start point sits just outside the T along the
    edge's outward normal. Points where the agent would touch another edge (the concave corners
    under the bar) or could not come straight in from the orbit circle are dropped.
    """
    import shapely.geometry as sg

    poly = sg.Polygon(T_OUTLINE)
    edges = np.roll(T_OUTLINE, -1, axis=0) - T_OUTLINE
    lengths = np.linalg.norm(edges, axis=1)
    cum = np.concatenate([[0.0], np.cumsum(lengths)])
    starts, directions = [], []
    for s in (np.arange(num) + 0.5) * cum[-1] / num:
        e = int(np.searchsorted(cum, s, side="right") - 1)
        tangent = edges[e] / lengths[e]
        normal = np.array([tangent[1], -tangent[0]])  # outward for a counter-clockwise outline
        start = T_OUTLINE[e] + tangent * (s - cum[e]) + normal * (AGENT_RADIUS + 2.0)
        ray = start - COG_LOCAL
        entry = COG_LOCAL + ray / np.linalg.norm(ray) * ORBIT_RADIUS
        if poly.distance(sg.Point(start)) < AGENT_RADIUS + 1.0:
            continue
        if poly.distance(sg.LineString([start, entry])) < AGENT_RADIUS + 1.0:
            continue
        starts.append(start)
        directions.append(-normal)
    return np.array(starts), np.array(directions)


class PushSimulator:
    """A scratch pymunk world built like gym-pusht's (its own walls, agent and T constructors) for
    trial pushes. It leaves out the env's contact-counting callback, which only feeds ``info`` and
    would cost more than the physics; the PD step is the env's, with the kinematic agent's position
    advanced as pymunk does (``p += v * dt``) so it need not be read back every substep."""

    def __init__(self) -> None:
        import pymunk
        from gym_pusht.envs.pusht import PushTEnv

        self.space = pymunk.Space()
        self.space.gravity, self.space.damping = (0, 0), 0.0
        self.space.add(*[PushTEnv.add_segment(self.space, a, b, 2) for a, b in
                         (((5, 506), (5, 5)), ((5, 5), (506, 5)), ((506, 5), (506, 506)), ((5, 506), (506, 506)))])
        self.agent = PushTEnv.add_circle(self.space, (256, 400), AGENT_RADIUS)
        self.block, _ = PushTEnv.add_tee(self.space, (256, 300), 0)
        probe = PushTEnv(obs_type="state")  # gains and timing from the env itself
        self.k_p, self.k_v, self.dt = float(probe.k_p), float(probe.k_v), float(probe.dt)
        self.substeps = int(1 / (probe.dt * probe.control_hz))

    def push(self, agent: np.ndarray, block: np.ndarray, angle: float, targets: np.ndarray) -> tuple[np.ndarray, float]:
        """Block origin and angle after the agent, at rest at ``agent``, tracks ``targets`` (one per env step)."""
        self.block.angle = angle  # angle first: setting it rotates about the centre of gravity
        self.block.position = (float(block[0]), float(block[1]))
        self.block.velocity, self.block.angular_velocity = (0.0, 0.0), 0.0
        px, py = float(agent[0]), float(agent[1])
        vx = vy = 0.0
        self.agent.position = (px, py)
        body, step, kp, kv, dt = self.agent, self.space.step, self.k_p, self.k_v, self.dt
        for gx, gy in targets.tolist():
            for _ in range(self.substeps):  # the env's PD step
                vx += (kp * (gx - px) - kv * vx) * dt
                vy += (kp * (gy - py) - kv * vy) * dt
                body.velocity = (vx, vy)
                step(dt)
                px += vx * dt
                py += vy * dt
        return np.array(self.block.position), float(self.block.angle)


def _arc(center: np.ndarray, radius: float, start: float, sweep: float) -> np.ndarray:
    n = max(2, int(np.ceil(abs(sweep) * radius / 4.0)))
    t = start + np.linspace(0.0, sweep, n)
    return center + radius * np.stack([np.cos(t), np.sin(t)], 1)


def _resample(path: np.ndarray, step: float) -> np.ndarray:
    """Points every ``step`` px along a polyline (excluding its start, including its end)."""
    seg = np.linalg.norm(np.diff(path, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg)])
    if cum[-1] < 1e-9:
        return path[-1:]
    at = np.append(np.arange(step, cum[-1], step), cum[-1])
    return np.stack([np.interp(at, cum, path[:, i]) for i in range(2)], 1)


class PushTExpert:
    """The scripted expert as a policy: ``reset(seed)`` draws the orbit direction (``mode``: 0 the
    angle around the block decreases — counter-clockwise on screen, where y points down — 1 it increases)."""

    def __init__(self) -> None:
        self.sim: PushSimulator | None = None
        self.starts, self.directions = contact_candidates()
        self.rng = np.random.default_rng(0)
        self.mode, self.queue = 1, []

    def reset(self, seed: int) -> None:
        self.rng = np.random.default_rng([int(seed), 0x5EED])  # not the env's stream for the same seed
        self.mode = int(self.rng.integers(2))
        self.queue = []

    def walk(self, agent: np.ndarray, cog: np.ndarray, start: np.ndarray) -> np.ndarray:
        """Waypoints from ``agent`` to ``start`` around the orbit circle in the episode's direction."""
        phi_a = np.arctan2(*(agent - cog)[::-1])
        phi_s = np.arctan2(*(start - cog)[::-1])
        sweep = (phi_s - phi_a) % (2 * np.pi)
        if self.mode == 0:  # the angle decreases
            sweep = sweep - 2 * np.pi if sweep > 1e-9 else 0.0
        path = np.concatenate([[agent], _arc(cog, ORBIT_RADIUS, phi_a, sweep), [start]])
        return _resample(path, WALK_STEP)

    def plan(self, obs: np.ndarray) -> list[np.ndarray]:
        if self.sim is None:
            self.sim = PushSimulator()
        agent, block, angle = obs[:2].astype(np.float64), obs[2:4].astype(np.float64), float(np.arctan2(obs[4], obs[5]))
        cog = block + _rotate(COG_LOCAL[None], angle)[0]
        before = pose_error(block, angle)
        starts = block + _rotate(self.starts, angle)
        directions = _rotate(self.directions, angle)
        options, scores = [], []
        for start, direction in zip(starts, directions):
            if not np.all((start > 0) & (start < 512)):
                continue
            walk = self.walk(agent, cog, start)
            walked = float(np.linalg.norm(np.diff(np.vstack([agent, walk]), axis=0), axis=1).sum())
            for steps, advance in PUSHES:
                targets = start + direction * advance * np.arange(1, steps + 1)[:, None]
                after = self.sim.push(start, block, angle, targets)
                scores.append(before - pose_error(*after) - WALK_COST * walked)
                options.append((walk, start, targets))
        scores = np.asarray(scores)
        logits = (scores - scores.max()) / max(0.2, TEMPERATURE * abs(scores.max()))
        p = np.exp(logits)
        walk, start, targets = options[int(self.rng.choice(len(options), p=p / p.sum()))]
        return [*walk, *([start] * SETTLE_STEPS), *targets]

    def __call__(self, obs_history: np.ndarray) -> np.ndarray:
        if not self.queue:
            self.queue = self.plan(np.asarray(obs_history[-1], dtype=np.float64))
        return np.clip(self.queue.pop(0), 0.0, 512.0)[None].astype(np.float32)
