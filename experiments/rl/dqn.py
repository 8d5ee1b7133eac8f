"""DQN with a sparse Q-network on gymnax environments, one compiled program per setting.

The whole run (acting in vectorised environments, the replay buffer, gradient steps, target
updates, sparse topology updates and the final greedy evaluation) is a pure function of a PRNG
key, ``train(key) -> RunResult``. :func:`make_train` builds it for one config; ``jax.vmap``
over keys trains several seeds in one compiled program, which is what makes >= 5 seeds
affordable on a laptop CPU.

The Q-network's optimizer is the library's optax wrapper, unchanged: ``dense`` is plain Adam,
``static`` / ``set`` / ``rigl`` wrap it with ``jaxsparse.static / set / rigl``. The setup
follows Graesser et al. 2022 ("The state of sparse training in deep reinforcement learning",
ICML) where it fits: a 512x512 ReLU MLP, ERK sparsity, a topology update every 1000 gradient
steps, drop fraction 0.5 cosine-decayed, updates stopping at 75% of training. DQN itself is
Mnih et al. 2015 (replay buffer, periodic hard target copy, Huber loss, epsilon-greedy).

Example:
  >>> cfg = DQNConfig(algorithm="rigl", sparsity=0.9, total_steps=50_000)
  >>> result = jax.jit(jax.vmap(make_train(cfg)))(jax.random.split(jax.random.key(0), 5))
  >>> result.eval_return.shape   # (5,): greedy return of each seed's final network
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

import jaxsparse

ALGORITHMS = ("dense", "static", "set", "rigl")
LOSSES = ("huber", "mse")


class DQNConfig(NamedTuple):
    """One DQN setting. Steps are environment steps summed over the ``num_envs`` envs.

    Attributes:
      env_name: a gymnax environment id (``gymnax.registered_envs``).
      hidden: hidden widths of the Q-network MLP.
      algorithm: ``dense``, ``static``, ``set`` or ``rigl``.
      sparsity: target sparsity of the prunable kernels (ignored for ``dense``).
      distribution: layer budget distribution (``erk``, ``er``, ``uniform``).
      total_steps: environment steps per seed, warm-up included.
      num_envs: environments stepped in parallel per seed; one gradient step per parallel
        step after the warm-up (so a replay ratio of one update per ``num_envs`` transitions).
      buffer_size: replay capacity in transitions (a multiple of ``num_envs``).
      batch_size: replay minibatch size.
      learning_rate: Adam step size.
      gamma: discount.
      learning_starts: random-policy warm-up steps that fill the buffer before learning.
      target_update_every: gradient steps between hard target-network copies.
      loss: ``huber`` (Mnih et al. 2015) or ``mse`` (Dopamine's classic-control DQN) of the
        one-step TD error.
      eps_start, eps_end, eps_fraction: epsilon decays linearly from ``eps_start`` to
        ``eps_end`` over the first ``eps_fraction`` of ``total_steps``.
      update_every: gradient steps between topology updates (SET / RigL).
      drop_fraction: initial drop fraction, cosine-decayed to 0 at ``end_fraction``.
      end_fraction: topology updates stop at this fraction of the gradient steps.
      num_logs: points on the training-return curve.
      eval_envs: episodes of the final greedy evaluation (one per env, run to the end).
    """

    env_name: str = "CartPole-v1"
    hidden: tuple = (512, 512)
    algorithm: str = "dense"
    sparsity: float = 0.9
    distribution: str = "erk"
    total_steps: int = 50_000
    num_envs: int = 4
    buffer_size: int = 50_000
    batch_size: int = 64
    learning_rate: float = 1e-3
    gamma: float = 0.99
    learning_starts: int = 1_000
    target_update_every: int = 500
    loss: str = "huber"
    eps_start: float = 1.0
    eps_end: float = 0.05
    eps_fraction: float = 0.2
    update_every: int = 1_000
    drop_fraction: float = 0.5
    end_fraction: float = 0.75
    num_logs: int = 50
    eval_envs: int = 32


class QNetwork(nn.Module):
    """A ReLU MLP from observations to one Q-value per action."""

    hidden: Sequence[int]
    num_actions: int

    @nn.compact
    def __call__(self, obs):
        x = obs.reshape(obs.shape[0], -1).astype(jnp.float32)
        for width in self.hidden:
            x = nn.relu(nn.Dense(width)(x))
        return nn.Dense(self.num_actions)(x)


class Replay(NamedTuple):
    """A circular replay buffer held as arrays (``N = buffer_size``)."""

    obs: jax.Array  # float32[N, *obs_shape]
    action: jax.Array  # int32[N]
    reward: jax.Array  # float32[N]
    next_obs: jax.Array  # float32[N, *obs_shape]
    terminal: jax.Array  # float32[N]: 1 where the episode terminated (not truncated)
    position: jax.Array  # int32[]: next write slot
    size: jax.Array  # int32[]: filled slots


class Episodes(NamedTuple):
    """Running per-env episode returns and the returns completed since the last log."""

    running: jax.Array  # float32[num_envs]
    completed_sum: jax.Array  # float32[]
    completed_count: jax.Array  # int32[]


class RunResult(NamedTuple):
    """What ``train(key)`` returns (leading seed axis when vmapped)."""

    curve_steps: jax.Array  # int32[num_logs]: env steps at the end of each log window
    curve_return: jax.Array  # float32[num_logs]: mean return of episodes completed in it
    curve_loss: jax.Array  # float32[num_logs]: mean TD loss in the window
    eval_return: jax.Array  # float32[]: mean greedy return of the final network
    sparsity: jax.Array  # float32[]: inactive fraction of all prunable kernels at the end
    params: Any


class Env(NamedTuple):
    """A gymnax environment's batched ``reset(keys)`` / ``step(keys, state, action)``."""

    reset: Any
    step: Any
    num_actions: int
    obs_shape: tuple
    max_steps: int


def _standard_promotion(fn):
    # gymnax mixes Python floats with int32 arrays (e.g. CartPole's force), which
    # jax_numpy_dtype_promotion="strict" rejects; the environments run under standard rules.
    def wrapped(*args):
        with jax.numpy_dtype_promotion("standard"):
            return fn(*args)

    return wrapped


def _standard_promotion_tx(tx: optax.GradientTransformation) -> optax.GradientTransformation:
    # optax's Adam computes ``decay ** count`` with an int32 count (rejected under strict
    # promotion); the inner optimizer runs under standard rules, the sparse wrapper does not.
    return optax.GradientTransformation(_standard_promotion(tx.init),
                                        _standard_promotion(tx.update))


def make_env(env_name: str) -> Env:
    """A batched gymnax environment; a clear error for an unknown id."""
    import gymnax

    if env_name not in gymnax.registered_envs:
        raise ValueError(
            f"unknown env_name {env_name!r}: not a gymnax environment; choose one of "
            f"{sorted(gymnax.registered_envs)}"
        )
    env, params = gymnax.make(env_name)
    reset = jax.vmap(env.reset, in_axes=(0, None))
    step = jax.vmap(env.step, in_axes=(0, 0, 0, None))
    return Env(
        reset=_standard_promotion(lambda keys: reset(keys, params)),
        step=_standard_promotion(lambda keys, state, action: step(keys, state, action, params)),
        num_actions=int(env.action_space(params).n),
        obs_shape=tuple(env.observation_space(params).shape),
        max_steps=int(params.max_steps_in_episode),
    )


def check_config(cfg: DQNConfig) -> None:
    """Raises ``ValueError`` naming the first inconsistent field of ``cfg``."""
    if cfg.algorithm not in ALGORITHMS:
        raise ValueError(f"unknown algorithm {cfg.algorithm!r}; choose one of {ALGORITHMS}")
    if cfg.loss not in LOSSES:
        raise ValueError(f"unknown loss {cfg.loss!r}; choose one of {LOSSES}")
    if cfg.buffer_size % cfg.num_envs:
        raise ValueError(
            f"buffer_size={cfg.buffer_size} must be a multiple of num_envs={cfg.num_envs}"
        )
    if cfg.learning_starts < cfg.batch_size:
        raise ValueError(
            f"learning_starts={cfg.learning_starts} must be >= batch_size={cfg.batch_size} "
            "so the first minibatch is drawn from real transitions"
        )
    if train_iterations(cfg) < cfg.num_logs:
        raise ValueError(
            f"total_steps={cfg.total_steps} leaves {train_iterations(cfg)} learning "
            f"iterations, fewer than num_logs={cfg.num_logs}; raise total_steps"
        )


def warmup_iterations(cfg: DQNConfig) -> int:
    return -(-cfg.learning_starts // cfg.num_envs)


def train_iterations(cfg: DQNConfig) -> int:
    """Parallel steps after the warm-up, rounded down to a multiple of ``num_logs``: each is
    one gradient step."""
    its = cfg.total_steps // cfg.num_envs - warmup_iterations(cfg)
    return (its // cfg.num_logs) * cfg.num_logs


def make_optimizer(cfg: DQNConfig, key: jax.Array) -> optax.GradientTransformation:
    """Adam, wrapped by the library's sparse transformation for the sparse algorithms."""
    inner = _standard_promotion_tx(optax.adam(cfg.learning_rate))
    if cfg.algorithm == "dense":
        return inner
    if cfg.algorithm == "static":
        return jaxsparse.static(inner, cfg.sparsity, key=key, distribution=cfg.distribution)
    factory = {"set": jaxsparse.set, "rigl": jaxsparse.rigl}[cfg.algorithm]
    return factory(
        inner, cfg.sparsity, key=key, distribution=cfg.distribution,
        end_step=max(1, int(cfg.end_fraction * train_iterations(cfg))),
        update_every=cfg.update_every, drop_fraction=cfg.drop_fraction,
    )


def epsilon(cfg: DQNConfig, env_step: jax.Array) -> jax.Array:
    """Linear decay from ``eps_start`` to ``eps_end`` over ``eps_fraction * total_steps``."""
    horizon = max(cfg.eps_fraction * cfg.total_steps, 1.0)
    frac = jnp.clip(env_step.astype(jnp.float32) / horizon, 0.0, 1.0)
    return cfg.eps_start + frac * (cfg.eps_end - cfg.eps_start)


def td_loss(q_fn, params, target_params, batch, gamma: float,
            loss: str = "huber") -> jax.Array:
    """Mean Huber (or squared) loss of the one-step TD error; bootstraps only where not
    terminal."""
    obs, action, reward, next_obs, terminal = batch
    q = jnp.take_along_axis(q_fn(params, obs), action[:, None], axis=1)[:, 0]
    next_q = jnp.max(q_fn(target_params, next_obs), axis=1)
    target = reward + gamma * (1.0 - terminal) * next_q
    target = jax.lax.stop_gradient(target)
    if loss == "mse":
        return jnp.mean(optax.l2_loss(q, target))
    return jnp.mean(optax.huber_loss(q, target))


def kernel_sparsity(params, masks) -> jax.Array:
    """Fraction of inactive weights over all prunable kernels (``None`` masks count as dense:
    ERK can leave small layers dense)."""
    p_leaves = jax.tree.leaves(params)
    m_leaves = (jax.tree.leaves(masks, is_leaf=jaxsparse.masks.is_none) if masks is not None
                else [None] * len(p_leaves))
    paths = jaxsparse.masks.leaf_paths(params)
    active, size = jnp.zeros((), jnp.int32), 0
    for path, p, m in zip(paths, p_leaves, m_leaves):
        if not jaxsparse.default_prunable(path, p):
            continue
        size += p.size
        active = active + (p.size if m is None else jnp.sum(m, dtype=jnp.int32))
    return 1.0 - active.astype(jnp.float32) / float(max(size, 1))


def make_train(cfg: DQNConfig):
    """The whole run as a pure function ``train(key) -> RunResult`` (jit / vmap it)."""
    check_config(cfg)
    env = make_env(cfg.env_name)
    num_actions, obs_shape = env.num_actions, env.obs_shape
    net = QNetwork(tuple(cfg.hidden), num_actions)
    n_warm, n_train = warmup_iterations(cfg), train_iterations(cfg)
    per_log = n_train // cfg.num_logs

    def q_fn(params, obs):
        return net.apply({"params": params}, obs)

    def greedy_or_random(params, obs, eps, key):
        k_explore, k_action = jax.random.split(key)
        greedy = jnp.argmax(q_fn(params, obs), axis=1).astype(jnp.int32)
        random_action = jax.random.randint(k_action, greedy.shape, 0, num_actions)
        explore = jax.random.uniform(k_explore, greedy.shape) < eps
        return jnp.where(explore, random_action, greedy)

    def env_step(env_state, action, key):
        obs, env_state, reward, terminated, truncated, info = env.step(
            jax.random.split(key, cfg.num_envs), env_state, action)
        return obs.astype(jnp.float32), env_state, reward.astype(jnp.float32), terminated, truncated, info

    def act(carry, params, eps, key):
        """One parallel step: act, store the transitions, track episode returns."""
        obs, env_state, replay, episodes = carry
        k_act, k_env = jax.random.split(key)
        action = greedy_or_random(params, obs, eps, k_act)
        next_obs, env_state, reward, terminated, truncated, info = env_step(
            env_state, action, k_env)
        # After an auto-reset ``next_obs`` is the new episode's first observation; the
        # transition must end in the last observation of the finished one.
        final_obs = info["final_observation"]
        at = replay.position
        replay = Replay(
            obs=jax.lax.dynamic_update_slice_in_dim(replay.obs, obs, at, 0),
            action=jax.lax.dynamic_update_slice_in_dim(replay.action, action, at, 0),
            reward=jax.lax.dynamic_update_slice_in_dim(replay.reward, reward, at, 0),
            next_obs=jax.lax.dynamic_update_slice_in_dim(replay.next_obs, final_obs, at, 0),
            terminal=jax.lax.dynamic_update_slice_in_dim(
                replay.terminal, terminated.astype(jnp.float32), at, 0),
            position=(at + cfg.num_envs) % cfg.buffer_size,
            size=jnp.minimum(replay.size + cfg.num_envs, cfg.buffer_size),
        )
        done = jnp.logical_or(terminated, truncated)
        running = episodes.running + reward
        episodes = Episodes(
            running=jnp.where(done, 0.0, running),
            completed_sum=episodes.completed_sum + jnp.sum(jnp.where(done, running, 0.0)),
            completed_count=episodes.completed_count + jnp.sum(done, dtype=jnp.int32),
        )
        return (next_obs, env_state, replay, episodes)

    def evaluate(params, key):
        """Mean undiscounted return of one greedy episode in each of ``eval_envs`` envs."""
        k_reset, k_run = jax.random.split(key)
        obs, state = env.reset(jax.random.split(k_reset, cfg.eval_envs))

        def body(carry, key):
            obs, state, total, alive = carry
            action = jnp.argmax(q_fn(params, obs), axis=1).astype(jnp.int32)
            obs, state, reward, terminated, truncated, _ = env.step(
                jax.random.split(key, cfg.eval_envs), state, action)
            total = total + jnp.where(alive, reward.astype(jnp.float32), 0.0)
            alive = jnp.logical_and(alive, jnp.logical_not(jnp.logical_or(terminated, truncated)))
            return (obs, state, total, alive), None

        init = (obs, state, jnp.zeros((cfg.eval_envs,), jnp.float32),
                jnp.ones((cfg.eval_envs,), jnp.bool_))
        (_, _, total, _), _ = jax.lax.scan(
            body, init, jax.random.split(k_run, env.max_steps))
        return jnp.mean(total)

    def train(key: jax.Array) -> RunResult:
        k_init, k_mask, k_reset, k_warm, k_train, k_eval = jax.random.split(key, 6)
        params = net.init(k_init, jnp.zeros((1, *obs_shape), jnp.float32))["params"]
        tx = make_optimizer(cfg, k_mask)
        opt_state = tx.init(params)
        masks = None if cfg.algorithm == "dense" else jaxsparse.get_masks(opt_state)
        if masks is not None:
            params = jaxsparse.apply_masks(params, masks)
        obs, env_state = env.reset(jax.random.split(k_reset, cfg.num_envs))
        obs = obs.astype(jnp.float32)
        n = cfg.buffer_size
        replay = Replay(
            obs=jnp.zeros((n, *obs_shape), jnp.float32), action=jnp.zeros((n,), jnp.int32),
            reward=jnp.zeros((n,), jnp.float32), next_obs=jnp.zeros((n, *obs_shape), jnp.float32),
            terminal=jnp.zeros((n,), jnp.float32), position=jnp.zeros((), jnp.int32),
            size=jnp.zeros((), jnp.int32))
        episodes = Episodes(jnp.zeros((cfg.num_envs,), jnp.float32),
                            jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))
        carry = (obs, env_state, replay, episodes)

        def warm(carry, key):
            return act(carry, params, jnp.ones((), jnp.float32), key), None

        carry, _ = jax.lax.scan(warm, carry, jax.random.split(k_warm, n_warm))

        def learn_step(state, xs):
            it, key = xs
            carry, params, target, opt_state, loss_sum = state
            k_act, k_sample = jax.random.split(key)
            env_steps = (n_warm + it + 1) * cfg.num_envs
            carry = act(carry, params, epsilon(cfg, env_steps), k_act)
            replay = carry[2]
            idx = jax.random.randint(k_sample, (cfg.batch_size,), 0, replay.size)
            batch = (replay.obs[idx], replay.action[idx], replay.reward[idx],
                     replay.next_obs[idx], replay.terminal[idx])
            loss, grads = jax.value_and_grad(td_loss, argnums=1)(
                q_fn, params, target, batch, cfg.gamma, cfg.loss)
            updates, opt_state = tx.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
            target = optax.periodic_update(params, target, it + 1, cfg.target_update_every)
            return (carry, params, target, opt_state, loss_sum + loss), None

        def log_window(state, xs):
            window, key = xs
            carry, params, target, opt_state = state
            episodes = carry[3]
            carry = carry[:3] + (Episodes(episodes.running, jnp.zeros((), jnp.float32),
                                          jnp.zeros((), jnp.int32)),)
            its = window * per_log + jnp.arange(per_log, dtype=jnp.int32)
            (carry, params, target, opt_state, loss_sum), _ = jax.lax.scan(
                learn_step, (carry, params, target, opt_state, jnp.zeros((), jnp.float32)),
                (its, jax.random.split(key, per_log)))
            ep = carry[3]
            mean_return = ep.completed_sum / jnp.maximum(ep.completed_count, 1).astype(
                jnp.float32)
            mean_return = jnp.where(ep.completed_count > 0, mean_return, jnp.nan)
            steps = (n_warm + (window + 1) * per_log) * cfg.num_envs
            return (carry, params, target, opt_state), (steps, mean_return,
                                                        loss_sum / float(per_log))

        (carry, params, _, opt_state), (steps, curve, losses) = jax.lax.scan(
            log_window, (carry, params, params, opt_state),
            (jnp.arange(cfg.num_logs, dtype=jnp.int32),
             jax.random.split(k_train, cfg.num_logs)))
        final_masks = None if cfg.algorithm == "dense" else jaxsparse.get_masks(opt_state)
        return RunResult(
            curve_steps=steps, curve_return=curve, curve_loss=losses,
            eval_return=evaluate(params, k_eval),
            sparsity=kernel_sparsity(params, final_masks), params=params)

    return train


def random_policy_return(env_name: str, key: jax.Array, episodes: int = 256) -> jax.Array:
    """Mean return of the uniform random policy over ``episodes`` episodes (a baseline)."""
    env = make_env(env_name)
    k_reset, k_run = jax.random.split(key)
    _, state = env.reset(jax.random.split(k_reset, episodes))

    def body(carry, key):
        state, total, alive = carry
        k_act, k_env = jax.random.split(key)
        action = jax.random.randint(k_act, (episodes,), 0, env.num_actions)
        _, state, reward, terminated, truncated, _ = env.step(
            jax.random.split(k_env, episodes), state, action)
        total = total + jnp.where(alive, reward.astype(jnp.float32), 0.0)
        alive = jnp.logical_and(alive, jnp.logical_not(jnp.logical_or(terminated, truncated)))
        return (state, total, alive), None

    init = (state, jnp.zeros((episodes,), jnp.float32), jnp.ones((episodes,), jnp.bool_))
    (_, total, _), _ = jax.lax.scan(
        body, init, jax.random.split(k_run, env.max_steps))
    return jnp.mean(total)


def train_seeds(cfg: DQNConfig, seeds: Sequence[int]) -> RunResult:
    """Trains one config for several seeds in one compiled, vmapped program."""
    keys = jnp.stack([jax.random.key(s) for s in seeds])
    return jax.jit(jax.vmap(make_train(cfg)))(keys)
