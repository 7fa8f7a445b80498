"""DOTS (difficulty-targeted online data selection, arXiv 2506.05316 §3) inside verl's trainer.

:class:`DotsStage` (``dots.enable``; settings :class:`recipe.config.DotsConfig`) uses three
stage hooks (:mod:`recipe.stages.base`; verl 0.9.1's V1 trainer has no curriculum-sampler
hook: its dataloader sampler is fixed to random/sequential):

- ``plan`` -> :meth:`DotsStage.maybe_round`: every ``dots.every`` (mu) steps, a
  *reference round*: K random training questions (``dots.ref_size``, or sized from the
  batch by ``dots.reference_ratio``: :func:`recipe.config.dots_reference_size`) are rolled out
  ``ref_samples`` (G) times each through the same agent loop and rollout servers as
  training (training sampling parameters, current weights), graded by the same reward,
  and their adaptive difficulty d = mean(1 - acc) is measured (paper Eq. 2). Every other
  question's difficulty is predicted by attention over the reference set (softmax of
  scaled dot products of adapter-projected embeddings, Eq. 3) with calibration
  (:func:`recipe.algos.dots.predict_difficulty`); reference questions keep their measured
  value. ``holdout_size`` reference questions are first predicted from the other K - H
  (with their own calibration) to report ``dots/pred_pearson``; the pairs are pooled over
  all rounds for ``dots/pred_pearson_pooled``.
- ``next_prompts`` -> :meth:`DotsStage.next_batch`: the next prompts are drawn with
  P(q) ~ exp(-|d_hat_q - 0.5| / tau) without replacement, from the whole training set
  each round (``dots.selection=per_round``, public code) or within an epoch (``per_epoch``)
  (:class:`recipe.algos.dots.DotsSelector`) and collated exactly as verl's dataloader does.
- ``metrics``: counts the step's fresh training rollouts, for the reference cost ratio.

Embeddings (mean-pooled last hidden state of ``dots.encoder``, default the policy's base
model) are computed once and cached on disk (:func:`embed_questions`). The
adapter is either trained offline (``python -m recipe.dots train-adapter``, from the
``dots_rounds.jsonl`` every run writes) and given as ``dots.adapter``, or absent: identity
projection (standardised, cosine / temperature) with a run-time calibration fitted on the
reference set's leave-one-out predictions.

Metrics (round steps): ``dots/pred_pearson`` (Pearson r on the ``holdout_size`` held-out
reference questions; NaN when undefined, i.e. constant predictions or measurements),
``dots/pred_holdout_n``, ``dots/calibration_fallback`` (1 when the run-time calibration fell
back to a constant), ``dots/holdout_calibration_fallback`` (the same for the held-out
prediction), ``dots/ref_difficulty_mean``, ``dots/ref_rollout_s`` (wall time of the reference
rollouts), ``dots/reference_rollouts`` (K x G of the round). Every step:
``dots/pred_pearson_pooled`` (over the held-out pairs of all rounds so far),
``dots/pred_pearson_undefined`` (rounds so far whose r was undefined),
``dots/pred_pooled_n``, ``dots/rounds``, ``dots/reference_ratio`` (all reference rollouts /
all fresh training rollouts so far), ``dots/selected_mean_difficulty`` (mean predicted
difficulty of the questions served this step); ``dots/effective_ratio`` is computed for
every run by :mod:`recipe.stages.reward_metrics`.

This module also holds the stage's file and model I/O: question embeddings
(:func:`embed_questions`, cached) and the rounds log (:func:`write_round` /
:func:`read_rounds`), which ``python -m recipe.dots`` uses too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from recipe.algos.dots import DotsSelector, adaptive_difficulty, load_adapter, pearson, pool_stats, predict_difficulty
from recipe.config import DotsConfig, check_dots_reference, dots_reference_size
from recipe.io import atomic_write
from recipe.stages.base import Handles, Stage, register_stage
from recipe.stages.rows import key_order, real_indices, response_metric, uid_of

logger = logging.getLogger(__name__)


# ----------------------------------------------------------------------------- embeddings and rounds files
#: Keys (and types) of one line of the rounds file (:func:`write_round` / :func:`read_rounds`).
ROUND_KEYS = {"step": int, "index": int, "prompt": str, "difficulty": float, "n": int}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".txt", ".model", ".jinja")


def save_npy(path: Path, arr: np.ndarray) -> None:
    """``np.save`` published atomically."""
    def write(tmp):
        with open(tmp, "wb") as fh:
            np.save(fh, arr)
    atomic_write(Path(path), write)


def _resolve_model(model_path) -> Path:
    path = Path(model_path).expanduser().resolve()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"embedding model not found: {path} (need a local HF model directory with "
                                "config.json; download a hub model first, e.g. `hf download ID --local-dir DIR`)")
    return path


def embedding_cache_path(texts: Sequence[str], model_path, cache_dir, max_length: int = 512,
                         dtype: str = "float32") -> Path:
    """The cache file :func:`embed_questions` uses for these inputs (see the module docstring)."""
    path = _resolve_model(model_path)
    h = hashlib.sha256()
    files = sorted((f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()
                   if f.is_file() and f.suffix in _WEIGHT_SUFFIXES)
    head = {"model": str(path), "config": (path / "config.json").read_text(encoding="utf-8"), "files": files,
            "max_length": int(max_length), "dtype": dtype, "pooling": "mean_last_hidden/1"}
    h.update(json.dumps(head, sort_keys=True).encode())
    for t in texts:
        b = str(t).encode("utf-8")
        h.update(len(b).to_bytes(8, "little") + b)
    return Path(cache_dir) / f"emb-{h.hexdigest()[:32]}.npy"


def _load_model(model_path: Path, device: str, dtype: str):
    """Loads (tokenizer, model) for mean pooling; tests monkeypatch this to prove a cache hit."""
    import transformers
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_path))
    tok.padding_side = "right"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    major = int(transformers.__version__.split(".")[0])
    kw = {"dtype" if major >= 5 else "torch_dtype": getattr(torch, dtype)}
    model = AutoModel.from_pretrained(str(model_path), **kw).to(device).eval()
    return tok, model


def embed_questions(texts: Sequence[str], model_path, cache_dir, batch_size: int = 32, max_length: int = 512,
                    device: str | None = None, log_every: int = 20) -> np.ndarray:
    """Mean-pooled last-hidden-state embeddings of ``texts`` with a frozen HF model, cached.

    Args:
        texts: N question strings (N >= 1).
        model_path: local HF model directory (a causal LM's directory works: ``AutoModel``
            loads the base model without the LM head).
        cache_dir: folder for ``emb-<sha256>.npy`` files (created if needed).
        batch_size: texts per forward pass (texts are sorted by length to limit padding).
        max_length: tokens kept per text (longer ones are truncated).
        device: torch device; default ``cuda`` when available, else ``cpu``.
        log_every: log progress (texts/s) every this many batches.

    Returns:
        [N, H] float32 embeddings, row i for ``texts[i]``.

    Raises:
        FileNotFoundError: ``model_path`` is not a model directory (names it).
        ValueError: ``texts`` is empty.
    """
    if len(texts) == 0:
        raise ValueError("embed_questions: no texts")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = "float32" if str(device).startswith("cpu") else "bfloat16"
    path = _resolve_model(model_path)
    cache = embedding_cache_path(texts, path, cache_dir, max_length, dtype)
    if cache.is_file():
        emb = np.load(cache)
        if emb.ndim == 2 and emb.shape[0] == len(texts) and emb.dtype == np.float32:
            logger.info("dots embeddings: cache hit %s %s", cache, emb.shape)
            return emb
        logger.warning("dots embeddings: ignoring malformed cache file %s (shape %s)", cache, emb.shape)
    tok, model = _load_model(path, device, dtype)
    order = np.argsort([len(t) for t in texts], kind="stable")
    out: np.ndarray | None = None
    start = time.perf_counter()
    with torch.inference_mode():
        for b, lo in enumerate(range(0, len(texts), batch_size)):
            idx = order[lo:lo + batch_size]
            enc = tok([str(texts[i]) for i in idx], padding=True, truncation=True, max_length=max_length,
                      return_tensors="pt").to(device)
            hidden = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"]).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            pooled = ((hidden.float() * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu().numpy()
            if out is None:
                out = np.empty((len(texts), pooled.shape[1]), dtype=np.float32)
            out[idx] = pooled
            done = min(lo + batch_size, len(texts))
            if (b + 1) % log_every == 0 or done == len(texts):
                rate = done / max(time.perf_counter() - start, 1e-9)
                logger.info("dots embeddings: %d/%d texts (%.1f texts/s)", done, len(texts), rate)
    save_npy(cache, out)
    return out


def question_texts(parquet) -> list[str]:
    """The user message of each row's ``prompt`` (verl parquet: a list of {role, content}).

    Raises:
        FileNotFoundError: missing file. ValueError: no ``prompt`` column, or a row without a
            user message (names the file and row).
    """
    import pandas as pd

    path = Path(parquet)
    if not path.is_file():
        raise FileNotFoundError(f"parquet file not found: {path}")
    frame = pd.read_parquet(path)
    if "prompt" not in frame.columns:
        raise ValueError(f"{path}: no 'prompt' column (columns: {list(frame.columns)})")
    texts = []
    for row, messages in enumerate(frame["prompt"]):
        users = [m.get("content") for m in (messages if messages is not None else []) if isinstance(m, dict)
                 and m.get("role") == "user" and isinstance(m.get("content"), str)]
        if not users:
            raise ValueError(f"{path}: row {row}: prompt has no user message with string content")
        texts.append(users[-1])
    return texts


def write_round(path, step: int, index: Sequence[int], prompt: Sequence[str], difficulty: Sequence[float],
                n: int | Sequence[int]) -> None:
    """Appends one selection round (one JSON line per question) to ``path``; see the module docstring.

    Raises:
        ValueError: lengths differ, difficulty outside [0, 1] or n < 1.
    """
    k = len(index)
    ns = [int(n)] * k if isinstance(n, (int, np.integer)) else [int(x) for x in n]
    if not (len(prompt) == len(difficulty) == len(ns) == k):
        raise ValueError(f"write_round: index/prompt/difficulty/n lengths differ: {k}, {len(prompt)}, "
                         f"{len(difficulty)}, {len(ns)}")
    lines = []
    for i, p, d, m in zip(index, prompt, difficulty, ns):
        if not 0.0 <= float(d) <= 1.0 or m < 1:
            raise ValueError(f"write_round: question {int(i)}: difficulty {d} not in [0, 1] or n {m} < 1")
        rec = {"step": int(step), "index": int(i), "prompt": str(p), "difficulty": float(d), "n": m}
        lines.append(json.dumps(rec, ensure_ascii=False) + "\n")
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as fh:
        fh.writelines(lines)


def read_rounds(paths) -> list[dict]:
    """Reads logged rounds from one or more JSONL files (blank lines skipped).

    Raises:
        FileNotFoundError: a missing file. ValueError: a malformed line (names file and 1-based line).
    """
    records = []
    for path in [paths] if isinstance(paths, (str, os.PathLike)) else paths:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"rounds file not found: {path}")
        with path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                    for key, typ in ROUND_KEYS.items():
                        if key not in rec:
                            raise ValueError(f"missing key {key!r}")
                        if typ is float and isinstance(rec[key], int) and not isinstance(rec[key], bool):
                            rec[key] = float(rec[key])
                        if not isinstance(rec[key], typ) or isinstance(rec[key], bool):
                            raise ValueError(f"{key!r} must be {typ.__name__}, got {rec[key]!r}")
                    if not 0.0 <= rec["difficulty"] <= 1.0 or rec["n"] < 1 or rec["index"] < 0:
                        raise ValueError("need 0 <= difficulty <= 1, n >= 1, index >= 0")
                except ValueError as err:  # json.JSONDecodeError is a ValueError
                    raise ValueError(f"{path}:{line_no}: malformed round record: {err}") from None
                records.append(rec)
    return records


def _user_text(prompt: Any) -> str:
    """The last user message of a verl chat prompt (list of {role, content})."""
    messages = list(prompt) if prompt is not None else []
    users = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    return str(users[-1]) if users else str(prompt)


@register_stage
class DotsStage(Stage):
    """Reference rounds, difficulty prediction and question selection (module docstring).
    Hooks: plan, next_prompts, metrics, state.

    Args:
        cfg: :class:`recipe.config.DotsConfig`.
        config: the run config (for the policy path).
    """

    name = "dots"
    config_cls = DotsConfig
    order = 10

    def __init__(self, cfg: DotsConfig, config):
        super().__init__(cfg, config)
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
        self.ref_size = cfg.ref_size if cfg.ref_size is not None else dots_reference_size(config)
        self.holdout_pred: list[float] = []  # held-out (predicted, measured) pairs of every round
        self.holdout_meas: list[float] = []
        self.undefined_rounds = 0
        self.reference_rollouts = 0  # all reference rollouts of the run
        self.fresh_rollouts = 0  # all fresh training rollouts of the run

    # ------------------------------------------------------------------ setup
    def prepare(self, dataset) -> None:
        """Embed every training question (cached) and load the adapter; once per run."""
        if self.emb is not None:
            return
        texts = [_user_text(dataset.dataframe[i][dataset.prompt_key]) for i in range(len(dataset))]
        t0 = time.perf_counter()
        self.emb = embed_questions(texts, self.encoder, self.cfg.cache_dir, batch_size=self.cfg.batch_size,
                                   max_length=self.cfg.max_length)
        logger.info("DOTS: %d question embeddings %s in %.1f s", len(texts), self.emb.shape, time.perf_counter() - t0)
        self.texts = texts
        self.stats = pool_stats(self.emb)  # one standardisation space for every round
        self.adapter = load_adapter(self.cfg.adapter) if self.cfg.adapter else None
        if self.ref_size > len(texts):
            raise ValueError(f"DOTS: K = {self.ref_size} reference questions (dots.ref_size / dots.reference_ratio) "
                             f"exceed the {len(texts)} training questions")
        self.selector = DotsSelector(len(texts), seed=self.cfg.seed, mode=self.cfg.selection)
        if self._pending_state:
            self._apply_state(self._pending_state)
            self._pending_state = None

    # ------------------------------------------------------------------ rounds
    def plan(self, h: Handles, n_fresh: int) -> tuple[int, dict]:
        """A reference round when due, before this step's prompts are submitted."""
        return n_fresh, self.maybe_round(h, h.step)

    def maybe_round(self, h: Handles, step: int) -> dict[str, float]:
        """Run a reference round when due (first step, or ``every`` steps after the last)."""
        self.prepare(h.dataset)
        due = self.pred is None or step - self.last_round_step >= self.cfg.every
        metrics = {"dots/rounds": float(self.rounds)}
        if due:
            metrics.update(self.reference_round(h, step))
        return metrics

    def reference_round(self, h: Handles, step: int) -> dict[str, float]:
        """Roll out K random questions G times, measure, predict everything, report."""
        cfg = self.cfg
        n = len(self.texts)
        ref = np.sort(self.rng.choice(n, size=self.ref_size, replace=False))
        t0 = time.perf_counter()
        accs = rollout_accuracy(h, ref.tolist(), cfg.ref_samples, cfg.metric)
        ref_s = time.perf_counter() - t0
        ok = np.array([len(a) > 0 for a in accs])
        if ok.sum() < 2:
            raise RuntimeError(f"DOTS reference round at step {step}: fewer than 2 questions came back with rewards")
        ref = ref[ok]
        d = adaptive_difficulty([a for a in accs if a])
        n_rollouts = int(sum(len(a) for a in accs))
        self.reference_rollouts += n_rollouts

        metrics = {"dots/ref_rollout_s": ref_s, "dots/ref_difficulty_mean": float(d.mean()),
                   "dots/reference_rollouts": float(n_rollouts)}
        metrics.update(self._holdout_quality(ref, d, step))

        pred, cal = self._predict(self.emb, ref, d)
        pred = np.asarray(pred, dtype=np.float64)
        pred[ref] = d  # measured beats predicted
        self.pred = pred
        self.selector.start_round()  # per_round: the whole training set is the pool again
        self.rounds += 1
        self.last_round_step = step
        metrics["dots/rounds"] = float(self.rounds)
        metrics["dots/calibration_fallback"] = float(cal.fallback)
        if cfg.rounds_file:
            write_round(cfg.rounds_file, step, ref.tolist(), [self.texts[i] for i in ref], d.tolist(), cfg.ref_samples)
        logger.info("DOTS round %d at step %d: K=%d, mean d=%.3f, held-out r=%s, %.1f s", self.rounds, step, len(ref),
                    d.mean(), metrics.get("dots/pred_pearson"), ref_s)
        return metrics

    def _holdout_quality(self, ref: np.ndarray, d: np.ndarray, step: int) -> dict[str, float]:
        """Predicts ``holdout_size`` random reference questions from the others (own calibration
        included) and scores them: per-round and pooled Pearson, undefined count."""
        hold_n = self.cfg.holdout_size
        if not hold_n:
            return {}
        check_dots_reference(len(ref), hold_n, f"DOTS reference round at step {step} ({len(ref)} questions "
                             "came back with rewards)")
        perm = self.rng.permutation(len(ref))
        hold, fit = perm[:hold_n], perm[hold_n:]
        pred_hold, cal = self._predict(self.emb[ref[hold]], ref[fit], d[fit])
        r = pearson(pred_hold, d[hold])
        self.undefined_rounds += int(not np.isfinite(r))
        self.holdout_pred += np.asarray(pred_hold, dtype=np.float64).tolist()
        self.holdout_meas += d[hold].tolist()
        return {"dots/pred_pearson": r, "dots/pred_holdout_n": float(hold_n),
                "dots/holdout_calibration_fallback": float(cal.fallback)}

    def _predict(self, query_emb: np.ndarray, ref: np.ndarray, d: np.ndarray) -> tuple[np.ndarray, Any]:
        return predict_difficulty(query_emb, self.emb[ref], d, adapter=self.adapter,
                                  temperature=self.cfg.temperature, stats=self.stats)

    # ------------------------------------------------------------------ selection
    def next_prompts(self, h: Handles, size: int):
        """verl's next chunk of prompts: the selected questions (:meth:`next_batch`)."""
        return self.next_batch(h, size)

    def next_batch(self, h: Handles, size: int):
        """The next ``size`` selected questions as verl's dataloader would yield them."""
        self.prepare(h.dataset)
        if self.pred is None:
            self.reference_round(h, h.step)
        idx = self.selector.select(self.pred, size, tau=self.cfg.tau, target=self.cfg.target)
        self._served_difficulty.extend(self.pred[idx].tolist())
        return collate_rows(h.dataset, idx.tolist())

    def after_update_actor(self, h: Handles, batch, metrics: dict) -> None:
        """Counts the step's fresh training rollouts (replayed and padding rows left out).

        Here, not in :meth:`metrics`: verl saves the step's checkpoint between the two, and
        the count must be in it (a resumed run's ``dots/reference_ratio`` equals the
        uninterrupted run's)."""
        tags = getattr(batch, "tags", None)
        if tags is not None:
            self.fresh_rollouts += len(real_indices(list(tags), fresh_only=True))

    def metrics(self, h: Handles, batch, metrics: dict) -> None:
        """:meth:`step_metrics` (the fresh rollouts were counted in :meth:`after_update_actor`)."""
        metrics.update(self.step_metrics())

    def step_metrics(self) -> dict[str, float]:
        """Every step's DOTS metrics (module docstring): pooled held-out Pearson, undefined
        rounds, reference cost ratio, and the mean predicted difficulty of the questions served
        since the last call."""
        out = {"dots/pred_pearson_pooled": pearson(self.holdout_pred, self.holdout_meas),
               "dots/pred_pooled_n": float(len(self.holdout_pred)),
               "dots/pred_pearson_undefined": float(self.undefined_rounds),
               "dots/rounds": float(self.rounds)}
        if self.fresh_rollouts:
            out["dots/reference_ratio"] = self.reference_rollouts / self.fresh_rollouts
        if self._served_difficulty:
            out["dots/selected_mean_difficulty"] = float(np.mean(self._served_difficulty))
            self._served_difficulty = []
        return out

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Predictions, selector (epoch, used questions, RNG), reference-draw RNG, round counters,
        the held-out pairs of every round and the rollout counters."""
        return {
            "pred": None if self.pred is None else self.pred.tolist(),
            "selector": None if self.selector is None else self.selector.state_dict(),
            "rng": self.rng.bit_generator.state,
            "rounds": self.rounds,
            "last_round_step": self.last_round_step,
            "holdout_pred": list(self.holdout_pred),
            "holdout_meas": list(self.holdout_meas),
            "undefined_rounds": self.undefined_rounds,
            "reference_rollouts": self.reference_rollouts,
            "fresh_rollouts": self.fresh_rollouts,
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
        # checkpoints written before these counters existed start them from zero
        self.holdout_pred = [float(x) for x in state.get("holdout_pred", [])]
        self.holdout_meas = [float(x) for x in state.get("holdout_meas", [])]
        self.undefined_rounds = int(state.get("undefined_rounds", 0))
        self.reference_rollouts = int(state.get("reference_rollouts", 0))
        self.fresh_rollouts = int(state.get("fresh_rollouts", 0))


def collate_rows(dataset, indices: list[int], uids: list[str] | None = None):
    """Rows ``indices`` of the training set, collated and tagged with ``uids`` (default:
    fresh random uuids, as verl's ``_fetch_one_gen_batch`` does)."""
    from verl.utils import tensordict_utils as tu
    from verl.utils.dataset.rl_dataset import collate_fn

    batch_dict = collate_fn([dataset[i] for i in indices])
    uids = uids if uids is not None else [str(uuid.uuid4()) for _ in indices]
    batch_dict["uid"] = np.array(list(uids), dtype=object)
    return tu.get_tensordict(batch_dict)


def rollout_accuracy(h: Handles, indices: list[int], n: int, metric: str = "acc",
                     poll_interval: float = 0.2, timeout_s: float | None = None) -> list[list[float]]:
    """Roll out training questions ``indices`` ``n`` times each through the agent loop
    (``h.agent_loop_manager``, training sampling parameters) and return each question's
    per-response ``metric``.

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

    batch = collate_rows(h.dataset, indices, h.new_uids(len(indices), "r") if h.new_uids else None)
    uids = list(batch["uid"])
    tu.assign_non_tensor_data(batch, "global_steps", h.step)
    from tensordict import NonTensorStack

    batch["__rollout_n__"] = NonTensorStack(*[int(n)] * len(uids))
    tags = [{"is_prompt": True, "status": "pending", "global_steps": h.step} for _ in uids]
    tq.kv_batch_put(keys=uids, partition_id="train", tags=tags)
    h.agent_loop_manager.generate_sequences(batch)

    wanted, start = set(uids), time.time()
    while True:
        listing = (tq.kv_list("train") or {}).get("train", {})
        done = {k for k in wanted if listing.get(k, {}).get("status") in ("finished", "failure")}
        if done == wanted:
            break
        if timeout_s is not None and time.time() - start > timeout_s:
            raise TimeoutError(f"DOTS reference rollouts: {len(wanted - done)} of {len(wanted)} groups unfinished")
        time.sleep(poll_interval)
    traj = sorted((k for k in listing if not listing[k].get("is_prompt", False) and uid_of(k) in wanted),
                  key=key_order)
    accs: dict[str, list[float]] = {u: [] for u in uids}
    if traj:
        data = tq.kv_batch_get(keys=traj, partition_id="train", select_fields=["extra_fields"])
        for key, extra in zip(traj, data.pop("extra_fields").tolist(), strict=True):
            accs[uid_of(key)].append(response_metric(extra, metric, "dots.metric"))
    tq.kv_clear(keys=[*uids, *traj], partition_id="train")
    return [accs[u] for u in uids]


