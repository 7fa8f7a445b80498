"""DOTS (difficulty-targeted online data selection, arXiv 2506.05316 §3) inside verl's trainer.

:class:`DotsStage` is driven by :class:`recipe.trainer.RecipeTrainer` through two narrow
hooks (verl 0.9.1's V1 trainer has no curriculum-sampler hook: its dataloader sampler is
fixed to random/sequential):

- ``prepare_step`` -> :meth:`DotsStage.maybe_round`: every ``dots.every`` (mu) steps, a
  *reference round*: ``ref_size`` (K) random training questions are rolled out
  ``ref_samples`` (G) times each through the same agent loop and rollout servers as
  training (training sampling parameters, current weights), graded by the same reward,
  and their adaptive difficulty d = mean(1 - acc) is measured (paper Eq. 2). Every other
  question's difficulty is predicted by attention over the reference set (softmax of
  scaled dot products of adapter-projected embeddings, Eq. 3) with calibration
  (:func:`recipe.algos.dots.predict_difficulty`); reference questions keep their measured
  value. A share ``holdout`` of the reference set is first predicted from the rest to
  report ``dots/pred_pearson``.
- ``_fetch_one_gen_batch`` -> :meth:`DotsStage.next_batch`: the next prompts are drawn with
  P(q) ~ exp(-|d_hat_q - 0.5| / tau) without replacement within an epoch
  (:class:`recipe.algos.dots.DotsSelector`) and collated exactly as verl's dataloader does.

Embeddings (mean-pooled last hidden state of ``dots.encoder``, default the policy's base
model) are computed once and cached on disk (:func:`recipe.dots.embed_questions`). The
adapter is either trained offline (``python -m recipe.dots train-adapter``, from the
``dots_rounds.jsonl`` every run writes) and given as ``dots.adapter``, or absent: identity
projection (standardised, cosine / temperature) with a run-time calibration fitted on the
reference set's leave-one-out predictions.

Metrics: ``dots/pred_pearson`` (held-out Pearson r, per round), ``dots/ref_difficulty_mean``,
``dots/ref_rollout_s`` (wall time of the reference rollouts), ``dots/rounds``,
``dots/selected_mean_difficulty`` (mean predicted difficulty of the questions served this
step); ``dots/effective_ratio`` is computed by the trainer from the fresh groups.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from recipe.algos.dots import (
    IDENTITY_TEMPERATURE,
    DotsSelector,
    adaptive_difficulty,
    pearson,
    pool_stats,
    predict_difficulty,
)
from recipe.sampler import response_metric

logger = logging.getLogger(__name__)


@dataclass
class DotsConfig:
    """The ``dots`` config node (defaults: the paper's, PAPERS.md §2).

    Attributes:
        enable: turn DOTS on.
        every: mu, steps between reference rounds (paper 2).
        ref_size: K, reference questions per round (paper 256; 128 works about as well).
        ref_samples: G, rollouts per reference question (paper 8).
        holdout: share of the reference set held out to report ``dots/pred_pearson``.
        tau: selection temperature (paper 1e-3: "closest to 0.5 first").
        target: preferred difficulty (0.5 maximises p(1-p), the expected gradient signal).
        encoder: HF model path for the embeddings (null: the policy's base model).
        adapter: path of an adapter from ``python -m recipe.dots train-adapter`` (null: identity).
        temperature: identity projection only: softmax(cosine / temperature) over the
            reference set (embeddings standardised per dimension over the training set).
        cache_dir: where embeddings are cached.
        max_length, batch_size: embedding tokenisation / batch size.
        metric: ``reward_extra_info`` key with per-response correctness in [0, 1].
        seed: seeds the reference draws and the selection.
        rounds_file: JSONL log of every reference round (the adapter's training data; null: off).
    """

    enable: bool = False
    every: int = 2
    ref_size: int = 256
    ref_samples: int = 8
    holdout: float = 0.25
    tau: float = 1e-3
    target: float = 0.5
    encoder: str | None = None
    adapter: str | None = None
    temperature: float = IDENTITY_TEMPERATURE
    cache_dir: str = "artifacts/cache/dots"
    max_length: int = 512
    batch_size: int = 32
    metric: str = "acc"
    seed: int = 0
    rounds_file: str | None = None

    @classmethod
    def from_config(cls, node) -> DotsConfig:
        """Build from the ``dots`` node; raises ValueError naming ``dots.<key>`` on bad values."""
        raw = dict(node or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(raw) - known)
        if unknown:
            raise ValueError(f"dots: unknown keys {unknown}; known: {sorted(known)}")
        cfg = cls(**raw)
        for f in fields(cls):
            value, kind = getattr(cfg, f.name), str(f.type)
            ok = (isinstance(value, bool) if kind == "bool"
                  else isinstance(value, int) and not isinstance(value, bool) if kind == "int"
                  else isinstance(value, (int, float)) and not isinstance(value, bool) if kind == "float"
                  else value is None or isinstance(value, str))
            if not ok:
                raise ValueError(f"dots.{f.name} must be {kind}, got {value!r}")
        checks = {
            "every": cfg.every >= 1,
            "ref_size": cfg.ref_size >= 2,
            "ref_samples": cfg.ref_samples >= 1,
            "holdout": 0.0 <= cfg.holdout < 1.0,
            "tau": cfg.tau > 0,
            "temperature": cfg.temperature > 0,
            "target": 0.0 <= cfg.target <= 1.0,
        }
        for key, ok in checks.items():
            if not ok:
                raise ValueError(f"dots.{key}={getattr(cfg, key)!r} is out of range")
        return cfg


def _user_text(prompt: Any) -> str:
    """The last user message of a verl chat prompt (list of {role, content})."""
    messages = list(prompt) if prompt is not None else []
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else str(prompt)


class DotsStage:
    """Reference rounds, difficulty prediction and question selection (module docstring).

    Args:
        cfg: :class:`DotsConfig`.
        config: the trainer's full config (for the policy path and the gen batch size).
    """

    def __init__(self, cfg: DotsConfig, config):
        self.cfg = cfg
        self.encoder = cfg.encoder or config.actor_rollout_ref.model.path
        self.pred: np.ndarray | None = None
        self.selector: DotsSelector | None = None
        self.rng = np.random.default_rng(cfg.seed)
        self.rounds = 0
        self.last_round_step = 0
        self.emb: np.ndarray | None = None
        self.adapter = None
        self._pending_state: dict | None = None
        self._served_difficulty: list[float] = []

    # ------------------------------------------------------------------ setup
    def setup(self, trainer) -> None:
        """Embed every training question (cached) and load the adapter; once per run."""
        if self.emb is not None:
            return
        from recipe.dots import embed_questions, load_adapter

        dataset = trainer.train_dataset
        texts = [_user_text(dataset.dataframe[i][dataset.prompt_key]) for i in range(len(dataset))]
        t0 = time.perf_counter()
        self.emb = embed_questions(texts, self.encoder, self.cfg.cache_dir, batch_size=self.cfg.batch_size,
                                   max_length=self.cfg.max_length)
        logger.info("DOTS: %d question embeddings %s in %.1f s", len(texts), self.emb.shape, time.perf_counter() - t0)
        self.texts = texts
        self.stats = pool_stats(self.emb)  # one standardisation space for every round
        self.adapter = load_adapter(self.cfg.adapter) if self.cfg.adapter else None
        if self.cfg.ref_size > len(texts):
            raise ValueError(f"dots.ref_size={self.cfg.ref_size} exceeds the {len(texts)} training questions")
        self.selector = DotsSelector(len(texts), seed=self.cfg.seed)
        if self._pending_state:
            self._apply_state(self._pending_state)
            self._pending_state = None

    # ------------------------------------------------------------------ rounds
    def maybe_round(self, trainer, step: int) -> dict[str, float]:
        """Run a reference round when due (first step, or ``every`` steps after the last)."""
        self.setup(trainer)
        due = self.pred is None or step - self.last_round_step >= self.cfg.every
        metrics = {"dots/rounds": float(self.rounds)}
        if due:
            metrics.update(self.reference_round(trainer, step))
        return metrics

    def reference_round(self, trainer, step: int) -> dict[str, float]:
        """Roll out K random questions G times, measure, predict everything, report."""
        cfg = self.cfg
        n = len(self.texts)
        ref = np.sort(self.rng.choice(n, size=cfg.ref_size, replace=False))
        t0 = time.perf_counter()
        accs = rollout_accuracy(trainer, ref.tolist(), cfg.ref_samples, cfg.metric)
        ref_s = time.perf_counter() - t0
        ok = np.array([len(a) > 0 for a in accs])
        if ok.sum() < 2:
            raise RuntimeError(f"DOTS reference round at step {step}: fewer than 2 questions came back with rewards")
        ref = ref[ok]
        d = adaptive_difficulty([a for a in accs if a])

        # held-out quality: predict a share of the reference set from the rest
        metrics = {"dots/ref_rollout_s": ref_s, "dots/ref_difficulty_mean": float(d.mean())}
        n_hold = int(round(cfg.holdout * len(ref)))
        if n_hold >= 3 and len(ref) - n_hold >= 2:  # Pearson r of 2 points is always +-1
            perm = self.rng.permutation(len(ref))
            hold, fit = perm[:n_hold], perm[n_hold:]
            pred_hold, _ = self._predict(self.emb[ref[hold]], ref[fit], d[fit])
            metrics["dots/pred_pearson"] = pearson(pred_hold, d[hold])

        pred, _ = self._predict(self.emb, ref, d)
        pred = np.asarray(pred, dtype=np.float64)
        pred[ref] = d  # measured beats predicted
        self.pred = pred
        self.rounds += 1
        self.last_round_step = step
        metrics["dots/rounds"] = float(self.rounds)
        if cfg.rounds_file:
            from recipe.dots import write_round

            write_round(cfg.rounds_file, step, ref.tolist(), [self.texts[i] for i in ref], d.tolist(), cfg.ref_samples)
        logger.info("DOTS round %d at step %d: K=%d, mean d=%.3f, r=%s, %.1f s", self.rounds, step, len(ref),
                    d.mean(), metrics.get("dots/pred_pearson"), ref_s)
        return metrics

    def _predict(self, query_emb: np.ndarray, ref: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, Any]:
        return predict_difficulty(query_emb, self.emb[ref], d, adapter=self.adapter,
                                  temperature=self.cfg.temperature, stats=self.stats)

    # ------------------------------------------------------------------ selection
    def next_batch(self, trainer, size: int):
        """The next ``size`` selected questions as verl's dataloader would yield them."""
        self.setup(trainer)
        if self.pred is None:
            self.reference_round(trainer, trainer.global_steps)
        idx = self.selector.select(self.pred, size, tau=self.cfg.tau, target=self.cfg.target)
        self._served_difficulty.extend(self.pred[idx].tolist())
        return collate_rows(trainer, idx.tolist())

    def step_metrics(self) -> dict[str, float]:
        """``dots/selected_mean_difficulty`` of the questions served since the last call."""
        if not self._served_difficulty:
            return {}
        out = {"dots/selected_mean_difficulty": float(np.mean(self._served_difficulty))}
        self._served_difficulty = []
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Predictions, selector (epoch, used questions, RNG), reference-draw RNG, round counters."""
        return {
            "pred": None if self.pred is None else self.pred.tolist(),
            "selector": None if self.selector is None else self.selector.state_dict(),
            "rng": self.rng.bit_generator.state,
            "rounds": self.rounds,
            "last_round_step": self.last_round_step,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` (applied at :meth:`setup` if the dataset is not loaded yet)."""
        if not state:
            return
        if self.selector is None:
            self._pending_state = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict[str, Any]) -> None:
        self.pred = None if state.get("pred") is None else np.asarray(state["pred"], dtype=np.float64)
        if self.pred is not None and len(self.pred) != len(self.texts):
            raise ValueError(f"DOTS state has {len(self.pred)} predictions, the training set {len(self.texts)} questions")
        if state.get("selector"):
            self.selector.load_state_dict(state["selector"])
        self.rng.bit_generator.state = state["rng"]
        self.rounds = int(state["rounds"])
        self.last_round_step = int(state["last_round_step"])


def collate_rows(trainer, indices: list[int]):
    """Rows ``indices`` of the training set, collated and tagged with fresh uids as verl's
    ``_fetch_one_gen_batch`` does."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import collate_fn

    batch_dict = collate_fn([trainer.train_dataset[i] for i in indices])
    batch_dict["uid"] = np.array([str(uuid.uuid4()) for _ in indices], dtype=object)
    return tu.get_tensordict(batch_dict)


def rollout_accuracy(trainer, indices: list[int], n: int, metric: str = "acc",
                     poll_interval: float = 0.2, timeout_s: float | None = None) -> list[list[float]]:
    """Roll out training questions ``indices`` ``n`` times each through the trainer's agent
    loop (training sampling parameters) and return each question's per-response ``metric``.

    The prompts go through TransferQueue's ``train`` partition, which is empty between
    steps; they are cleared before returning.

    Returns:
        ``[len(indices)]`` lists of accuracies (empty for a question whose rollouts failed).

    Raises:
        TimeoutError: after ``timeout_s`` seconds without all groups finishing.
        RuntimeError: a response without ``metric`` in its ``reward_extra_info``.
    """
    import transfer_queue as tq
    from verl.utils import tensordict_utils as tu

    batch = collate_rows(trainer, indices)
    uids = list(batch["uid"])
    tu.assign_non_tensor_data(batch, "global_steps", trainer.global_steps)
    from tensordict import NonTensorStack

    batch["__rollout_n__"] = NonTensorStack(*[int(n)] * len(uids))
    tags = [{"is_prompt": True, "status": "pending", "global_steps": trainer.global_steps} for _ in uids]
    tq.kv_batch_put(keys=uids, partition_id="train", tags=tags)
    trainer.agent_loop_manager.generate_sequences(batch)

    wanted, start = set(uids), time.time()
    while True:
        listing = (tq.kv_list("train") or {}).get("train", {})
        done = {k for k in wanted if listing.get(k, {}).get("status") in ("finished", "failure")}
        if done == wanted:
            break
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"DOTS reference rollouts: {len(wanted - done)} of {len(wanted)} groups unfinished")
        time.sleep(poll_interval)
    traj = [k for k in listing if not listing[k].get("is_prompt", False) and k.split("_")[0] in wanted]
    accs: dict[str, list[float]] = {u: [] for u in uids}
    if traj:
        data = tq.kv_batch_get(keys=traj, partition_id="train", select_fields=["extra_fields"])
        for key, extra in zip(traj, data.pop("extra_fields").tolist(), strict=True):
            accs[key.split("_")[0]].append(response_metric(extra, metric, "dots.metric"))
    tq.kv_clear(keys=[*uids, *traj], partition_id="train")
    return [accs[u] for u in uids]


