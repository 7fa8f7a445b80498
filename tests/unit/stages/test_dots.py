"""Tests of the DOTS stage (recipe/stages/dots.py) without Ray or a verl run: reference
rounds, measured-beats-predicted, held-out Pearson, the round schedule, selection through
the stage hooks, state round trip; the reference rollouts through the agent loop
(``rollout_accuracy`` with TransferQueue and the agent-loop manager faked); and the stage's
file / model I/O (question embeddings with their cache, question texts, the rounds file).

The stage gets :class:`~recipe.stages.base.Handles` (a dataset of N = 40 questions in 4
clusters); the embedding model is replaced by one-hot cluster embeddings, the reference
rollouts by synthetic accuracies (question i has a known difficulty), and collation by the
identity on indices.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch

import recipe.stages.dots as sd
from recipe.config import DotsConfig
from recipe.stages.base import Handles, Stage
from recipe.stages.dots import DotsStage
from tests.paths import GSM8K_TRAIN, QWEN_TOK, require

N, CLUSTERS, G = 40, 4, 16
# correct responses out of G per cluster (difficulty 1 - c/G: 0.875, 0.625, 0.5, 0.25) and a
# per-question jitter of -1, 0, +1 correct answers
CLUSTER_CORRECT = [2, 6, 8, 12]


def cluster(i: int) -> int:
    return i % CLUSTERS


def n_correct(i: int) -> int:
    return CLUSTER_CORRECT[cluster(i)] + (i // CLUSTERS) % 3 - 1


def true_difficulty(i: int) -> float:
    return 1.0 - n_correct(i) / G


class FakeDataset:
    prompt_key = "prompt"

    def __init__(self, n=N):
        self.dataframe = [{"prompt": [{"role": "system", "content": "be brief"},
                                      {"role": "user", "content": f"question {i}"}]} for i in range(n)]

    def __len__(self):
        return len(self.dataframe)


class Env:
    """The fakes plus call logs (``embed_calls``: texts per call, ``ref_calls``: reference
    indices); ``h`` is what the trainer hands the stage."""

    def __init__(self, monkeypatch, n=N, fail=()):
        self.embed_calls: list[list[str]] = []
        self.ref_calls: list[list[int]] = []
        self.fail = set(fail)
        self.h = Handles(config=TRAINER_CONFIG, step=1, dataset=FakeDataset(n))
        monkeypatch.setattr(sd, "embed_questions", self.embed)
        monkeypatch.setattr(sd, "rollout_accuracy", self.rollout_accuracy)
        monkeypatch.setattr(sd, "collate_rows", self.collate_rows)

    def collate_rows(self, dataset, idx):
        assert dataset is self.h.dataset
        return list(idx)

    def embed(self, texts, model_path, cache_dir, batch_size=32, max_length=512):
        assert model_path == "/models/policy" and cache_dir == "/cache/dots"
        self.embed_calls.append(list(texts))
        emb = np.zeros((len(texts), CLUSTERS), dtype=np.float32)
        for row, text in enumerate(texts):
            emb[row, cluster(int(text.split()[-1]))] = 1.0
        return emb

    def rollout_accuracy(self, h, indices, n, metric="acc"):
        assert h is self.h and n == G and metric == "acc"
        self.ref_calls.append(list(indices))
        return [[] if i in self.fail else [1.0] * n_correct(i) + [0.0] * (G - n_correct(i)) for i in indices]


TRAINER_CONFIG = SimpleNamespace(actor_rollout_ref=SimpleNamespace(model=SimpleNamespace(path="/models/policy")))


def make_stage(**kw) -> DotsStage:
    node = {"enable": True, "every": 2, "ref_size": 20, "ref_samples": G, "holdout_size": 5, "tau": 1e-3,
            "cache_dir": "/cache/dots", "seed": 0, **kw}
    return DotsStage(DotsConfig.from_config(node), TRAINER_CONFIG)


# ----------------------------------------------------------------------------- DotsStage
def test_prepare_embeds_user_messages_once(monkeypatch):
    env = Env(monkeypatch)
    stage = make_stage()
    stage.prepare(env.h.dataset)
    stage.prepare(env.h.dataset)
    assert env.embed_calls == [[f"question {i}" for i in range(N)]]  # the user message, once
    assert stage.emb.shape == (N, CLUSTERS) and stage.selector.num_questions == N
    assert stage.encoder == "/models/policy"
    assert make_stage(encoder="/models/enc").encoder == "/models/enc"


def test_first_round_measures_and_keeps_reference_difficulty(monkeypatch):
    env = Env(monkeypatch)
    stage = make_stage()
    metrics = stage.maybe_round(env.h, 1)
    assert len(env.ref_calls) == 1
    ref = env.ref_calls[0]
    assert len(ref) == 20 == len(set(ref)) and ref == sorted(ref) and all(0 <= i < N for i in ref)
    measured = [true_difficulty(i) for i in ref]
    assert metrics["dots/rounds"] == 1.0 and stage.rounds == 1 and stage.last_round_step == 1
    assert metrics["dots/ref_difficulty_mean"] == pytest.approx(float(np.mean(measured)), abs=1e-12)
    assert metrics["dots/ref_rollout_s"] >= 0.0
    assert stage.pred.shape == (N,) and stage.pred.dtype == np.float64
    for i, d in zip(ref, measured):
        assert stage.pred[i] == d, i  # measured beats predicted, exactly
    # the others are predicted from their cluster: within 0.07 of the cluster's true mean
    others = [i for i in range(N) if i not in ref]
    for i in others:
        cluster_mean = np.mean([true_difficulty(j) for j in range(N) if cluster(j) == cluster(i)])
        assert abs(stage.pred[i] - cluster_mean) < 0.07, (i, stage.pred[i], cluster_mean)


def test_pred_pearson_on_clustered_set(monkeypatch):
    env = Env(monkeypatch)
    stage = make_stage()
    metrics = stage.maybe_round(env.h, 1)
    assert metrics["dots/pred_holdout_n"] == 5.0  # dots.holdout_size held out of K = 20
    assert metrics["dots/pred_pearson"] > 0.8
    assert metrics["dots/calibration_fallback"] == 0.0 and metrics["dots/holdout_calibration_fallback"] == 0.0
    assert metrics["dots/reference_rollouts"] == 20 * G
    # the pooled Pearson is over exactly the held-out pairs of every round so far
    assert len(stage.holdout_pred) == len(stage.holdout_meas) == 5
    stage.maybe_round(env.h, 3)
    assert len(stage.holdout_pred) == 10
    pooled = stage.step_metrics()
    assert pooled["dots/pred_pooled_n"] == 10.0 and pooled["dots/pred_pearson_undefined"] == 0.0
    assert pooled["dots/pred_pearson_pooled"] == pytest.approx(
        float(np.corrcoef(stage.holdout_pred, stage.holdout_meas)[0, 1]), abs=1e-12)
    # holdout_size 0: explicitly off
    env2 = Env(monkeypatch)
    assert "dots/pred_pearson" not in make_stage(holdout_size=0).maybe_round(env2.h, 1)


def test_undefined_pearson_is_counted_not_dropped(monkeypatch):
    """Every question equally hard: constant measurements, Pearson undefined -> NaN, counted,
    and the pooled value stays NaN (not silently skipped)."""
    env = Env(monkeypatch)
    monkeypatch.setattr(env, "rollout_accuracy", lambda h, idx, n, metric="acc": [[1.0] * 8 + [0.0] * 8 for _ in idx])
    monkeypatch.setattr(sd, "rollout_accuracy", env.rollout_accuracy)
    stage = make_stage()
    m = stage.maybe_round(env.h, 1)
    assert math.isnan(m["dots/pred_pearson"])
    m = stage.step_metrics()
    assert m["dots/pred_pearson_undefined"] == 1.0 and math.isnan(m["dots/pred_pearson_pooled"])
    assert m["dots/pred_pooled_n"] == 5.0


def test_calibration_fallback_is_reported(monkeypatch):
    """Difficulty anti-correlated with the embedding clusters' neighbours: leave-one-out
    predictions get a negative slope and the run-time calibration falls back to a constant."""
    env = Env(monkeypatch)
    # every question its own direction (identity embeddings): leave-one-out attention is uniform over
    # the others, so each prediction is the mean of the other K - 1, anti-correlated with d
    monkeypatch.setattr(env, "embed", lambda texts, *a, **k: np.eye(len(texts), dtype=np.float32))
    monkeypatch.setattr(sd, "embed_questions", env.embed)
    m = make_stage(holdout_size=0).maybe_round(env.h, 1)
    assert m["dots/calibration_fallback"] == 1.0


def test_held_out_count_needs_a_large_enough_reference_set():
    from recipe.config import ConfigError

    with pytest.raises(ConfigError, match=r"dots\.ref_size: K = 8 .* dots\.holdout_size=5 .* need K >= 9"):
        make_stage(ref_size=8)
    make_stage(ref_size=9)  # 5 held out + 4 to predict them from


def test_selection_per_round_vs_per_epoch(monkeypatch):
    """per_round (public code): a new round returns every question to the pool, so the
    closest-to-0.5 questions are served again right after it; per_epoch: they are not served
    again until the other 36 of the 40 were."""
    served = {}
    for mode in ("per_round", "per_epoch"):
        env = Env(monkeypatch)
        stage = make_stage(selection=mode, every=1)
        stage.maybe_round(env.h, 1)
        first = stage.next_batch(env.h, 4)
        stage.maybe_round(env.h, 2)  # a new round (the same clusters stay closest to 0.5)
        served[mode] = (first, stage.next_batch(env.h, 4), stage.pred)
    first, second, pred = served["per_round"]
    assert {cluster(i) for i in first} == {cluster(i) for i in second} == {2}  # again the d ~ 0.5 cluster
    assert set(first) & set(second)  # questions served in round 1 come back in round 2
    first, second, pred = served["per_epoch"]
    assert {cluster(i) for i in first} == {2} and not set(first) & set(second)  # no repeat inside the epoch


def test_next_batch_closest_to_target_and_no_repeat_within_epoch(monkeypatch):
    env = Env(monkeypatch)
    stage = make_stage()
    stage.maybe_round(env.h, 1)
    dist = np.abs(stage.pred - 0.5)
    first = stage.next_batch(env.h, 4)
    assert isinstance(first, list) and len(first) == 4 == len(set(first))
    kth = np.sort(dist)[3]
    assert max(dist[first]) <= kth + 1e-9, (first, dist[first], kth)  # the 4 closest to 0.5 (tau 1e-3)
    assert all(cluster(i) == 2 for i in first)  # the cluster of difficulty ~0.5
    assert stage.step_metrics()["dots/selected_mean_difficulty"] == pytest.approx(float(np.mean(stage.pred[first])))
    assert "dots/selected_mean_difficulty" not in stage.step_metrics()  # nothing served since
    served = list(first)
    for _ in range(N // 4 - 1):
        served += stage.next_batch(env.h, 4)
    assert sorted(served) == list(range(N))  # one epoch: every question once, none repeated
    d = dist[served]
    assert np.all(np.diff(d) >= -1e-2), d  # served in priority order (ties within 1e-2 may swap)
    nxt = stage.next_batch(env.h, 4)  # epoch 2 starts again at the closest
    assert max(dist[nxt]) <= kth + 1e-9
    assert len(env.ref_calls) == 1  # serving never triggers a round once predictions exist


def test_next_batch_before_any_round_runs_one(monkeypatch):
    env = Env(monkeypatch)
    env.h.step = 5
    stage = make_stage()
    idx = stage.next_batch(env.h, 3)
    assert len(env.ref_calls) == 1 and stage.rounds == 1 and stage.last_round_step == 5 and len(idx) == 3


def test_hooks_plan_next_prompts_and_metrics(monkeypatch):
    """What the trainer calls: ``plan`` (a round when due; the fresh count unchanged),
    ``next_prompts`` (the selection) and ``metrics`` (mean difficulty served this step)."""
    env = Env(monkeypatch)
    stage = make_stage(every=2)
    n_fresh, metrics = stage.plan(env.h, 4)
    assert n_fresh == 4 and metrics["dots/rounds"] == 1.0 and "dots/ref_difficulty_mean" in metrics
    assert len(env.ref_calls) == 1 and stage.last_round_step == 1
    env.h.step = 2
    assert stage.plan(env.h, 4) == (4, {"dots/rounds": 1.0})  # not due
    served = stage.next_prompts(env.h, 4) + stage.next_prompts(env.h, 2)
    assert len(served) == 6 == len(set(served))
    metrics = {"other/x": 1.0}
    # the step's rows: 6 fresh prompts x 2 responses, a replayed group and a padding row
    tags = [{}] * 12 + [{"replayed": True}] * 2 + [{"is_padding": True}]
    batch = SimpleNamespace(tags=tags)
    stage.after_update_actor(env.h, batch, metrics)  # counted before verl saves the checkpoint
    assert stage.state_dict()["fresh_rollouts"] == 12
    stage.metrics(env.h, batch, metrics)
    assert stage.fresh_rollouts == 12  # not counted twice
    assert metrics["other/x"] == 1.0
    assert metrics["dots/selected_mean_difficulty"] == pytest.approx(float(np.mean(stage.pred[served])))
    assert metrics["dots/reference_ratio"] == pytest.approx(20 * G / 12)  # one round of K x G / 12 fresh rollouts
    metrics = {}
    stage.metrics(env.h, None, metrics)  # nothing served since
    assert "dots/selected_mean_difficulty" not in metrics and metrics["dots/rounds"] == 1.0
    env.h.step = 3
    assert stage.plan(env.h, 4)[1]["dots/rounds"] == 2.0 and len(env.ref_calls) == 2


def test_stage_registration_and_config_node():
    assert issubclass(DotsStage, Stage) and DotsStage.name == "dots" and DotsStage.order == 10
    config = {"dots": {"enable": True, "every": 3}}
    cfg = DotsStage.load_config(config)
    assert isinstance(cfg, DotsConfig) and cfg.every == 3 and DotsStage.enabled(cfg, config)
    assert not DotsStage.enabled(DotsStage.load_config({}), {})
    with pytest.raises(ValueError, match=r"dots\.evry"):
        DotsStage.load_config({"dots": {"evry": 3}})


def test_maybe_round_every_steps(monkeypatch, tmp_path):
    env = Env(monkeypatch)
    rounds_file = tmp_path / "runs" / "dots_rounds.jsonl"
    stage = make_stage(every=2, rounds_file=str(rounds_file))
    m1 = stage.maybe_round(env.h, 1)
    assert m1["dots/rounds"] == 1.0 and len(env.ref_calls) == 1
    m2 = stage.maybe_round(env.h, 2)  # step + 1 < every: no round
    assert m2 == {"dots/rounds": 1.0} and len(env.ref_calls) == 1
    m3 = stage.maybe_round(env.h, 3)  # step + every
    assert m3["dots/rounds"] == 2.0 and len(env.ref_calls) == 2 and stage.last_round_step == 3
    assert env.ref_calls[0] != env.ref_calls[1]  # a fresh random reference set
    assert stage.maybe_round(env.h, 4) == {"dots/rounds": 2.0}
    lines = [json.loads(x) for x in rounds_file.read_text().splitlines()]
    assert len(lines) == 2 * 20  # K lines per round
    for rec, (step, i) in zip(lines, [(1, i) for i in env.ref_calls[0]] + [(3, i) for i in env.ref_calls[1]]):
        assert rec == {"step": step, "index": i, "prompt": f"question {i}", "difficulty": true_difficulty(i), "n": G}


def test_failed_reference_questions_are_left_out(monkeypatch):
    env = Env(monkeypatch, fail=set(range(0, N, 2)))  # every even question's rollouts fail
    stage = make_stage()
    metrics = stage.maybe_round(env.h, 1)
    ok = [i for i in env.ref_calls[0] if i % 2]
    assert metrics["dots/ref_difficulty_mean"] == pytest.approx(float(np.mean([true_difficulty(i) for i in ok])))
    for i in ok:
        assert stage.pred[i] == true_difficulty(i)
    env_all = Env(monkeypatch, fail=set(range(N)))
    with pytest.raises(RuntimeError, match="fewer than 2 questions came back"):
        make_stage().maybe_round(env_all.h, 1)


def test_state_round_trip_serves_the_same_questions(monkeypatch):
    env = Env(monkeypatch)
    a = make_stage()
    a.maybe_round(env.h, 1)
    a.next_batch(env.h, 4)
    a.next_batch(env.h, 4)
    state = a.state_dict()
    json.dumps(state)  # plain data (saved with torch.save in recipe_state.pt)
    b = make_stage()
    b.load_state_dict(state)  # before prepare: applied when the dataset is embedded
    assert b.pred is None
    b.prepare(env.h.dataset)
    assert np.array_equal(b.pred, a.pred) and (b.rounds, b.last_round_step) == (1, 1)
    for _ in range(12):  # across the epoch boundary (40 questions, 8 already served)
        assert b.next_batch(env.h, 4) == a.next_batch(env.h, 4)
    # the reference draws continue identically too
    a.maybe_round(env.h, 3)
    b.maybe_round(env.h, 3)
    assert env.ref_calls[-1] == env.ref_calls[-2] and np.array_equal(a.pred, b.pred)
    # a stage restored after prepare applies the state at once
    c = make_stage()
    c.prepare(env.h.dataset)
    c.load_state_dict(a.state_dict())
    assert np.array_equal(c.pred, a.pred) and c.next_batch(env.h, 4) == a.next_batch(env.h, 4)
    c.load_state_dict({})  # DOTS was off in the checkpoint: ignored
    assert c.rounds == 2


def test_state_of_another_dataset_is_rejected(monkeypatch):
    env = Env(monkeypatch)
    a = make_stage()
    a.maybe_round(env.h, 1)
    small = Env(monkeypatch, n=30)
    b = make_stage()
    b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="40 predictions, the training set 30 questions"):
        b.prepare(small.h.dataset)


def test_ref_size_larger_than_dataset(monkeypatch):
    env = Env(monkeypatch, n=10)
    with pytest.raises(ValueError, match=r"K = 20 reference questions .* exceed the 10 training questions"):
        make_stage(ref_size=20).prepare(env.h.dataset)


# sanity of the synthetic set the DOTS tests rely on (so a broken fixture cannot pass silently)
def test_synthetic_difficulties():
    d = [true_difficulty(i) for i in range(N)]
    assert min(d) > 0 and max(d) < 1
    means = [np.mean([d[i] for i in range(N) if cluster(i) == c]) for c in range(CLUSTERS)]
    assert np.allclose(means, [0.875, 0.625, 0.5, 0.25], atol=0.01)  # jitter -1, 0, +1: mean shift 0.1 / G
    assert math.isclose(true_difficulty(2), 0.5 + 1 / G)  # i = 2: cluster 2, jitter -1 correct
    assert true_difficulty(6) == 0.5  # i = 6: jitter 0


# --------------------------------------------------------------------------- embeddings (I/O)

TEXTS = [
    "Natalia sold clips to 48 of her friends in April. How many clips did she sell?",
    "What is 2 + 2?",
    "Weng earns $12 an hour for babysitting. Yesterday, she did 50 minutes. How much did she earn?",
    "Betty is saving money for a new wallet which costs $100.",
    "Solve for x: 3x + 5 = 20.",
]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory) -> Path:
    require(GSM8K_TRAIN, QWEN_TOK / "tokenizer.json")
    from recipe.models import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("dots") / "tiny", vocab_size=1024, max_train_rows=300,
                            hidden_size=32, intermediate_size=64)


def test_embed_questions_shape_pooling_batch_invariance_and_cache(tiny_model, tmp_path, monkeypatch):
    emb = sd.embed_questions(TEXTS, tiny_model, tmp_path / "c1", batch_size=2, device="cpu")
    assert emb.shape == (5, 32) and emb.dtype == np.float32
    # row 1 = plain mean of the last hidden state of the unpadded text
    tok, model = sd._load_model(tiny_model, "cpu", "float32")
    with torch.no_grad():
        ids = tok(TEXTS[1], return_tensors="pt")
        manual = model(**ids).last_hidden_state[0].mean(0).numpy()
    np.testing.assert_allclose(emb[1], manual, atol=1e-5)
    again = sd.embed_questions(TEXTS, tiny_model, tmp_path / "c2", batch_size=5, device="cpu")
    np.testing.assert_allclose(again, emb, atol=1e-5)  # right padding: batch-invariant

    def boom(*args, **kwargs):
        raise AssertionError("model loaded despite a cache hit")

    monkeypatch.setattr(sd, "_load_model", boom)
    hit = sd.embed_questions(TEXTS, tiny_model, tmp_path / "c1", batch_size=2, device="cpu")
    np.testing.assert_array_equal(hit, emb)
    p1 = sd.embedding_cache_path(TEXTS, tiny_model, tmp_path / "c1")
    p2 = sd.embedding_cache_path(TEXTS[:4] + ["Solve for x: 3x + 5 = 21."], tiny_model, tmp_path / "c1")
    p3 = sd.embedding_cache_path(TEXTS, tiny_model, tmp_path / "c1", max_length=64)
    assert p1.is_file() and len({p1, p2, p3}) == 3
    with pytest.raises(AssertionError, match="cache hit"):  # different texts -> a miss
        sd.embed_questions(TEXTS[:2], tiny_model, tmp_path / "c1", device="cpu")


def test_embed_questions_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no_such_model"):
        sd.embed_questions(["x"], tmp_path / "no_such_model", tmp_path)
    with pytest.raises(ValueError, match="no texts"):
        sd.embed_questions([], tmp_path, tmp_path)


def _prompt_parquet(path: Path, rows) -> Path:
    pd.DataFrame({"prompt": rows, "data_source": ["gsm8k"] * len(rows)}).to_parquet(path)
    return path


def test_question_texts(tmp_path):
    sys_msg = {"role": "system", "content": "Reason step by step."}
    f = _prompt_parquet(tmp_path / "a.parquet", [[sys_msg, {"role": "user", "content": "Q0"}],
                                                 [{"role": "user", "content": "Q1"}]])
    assert sd.question_texts(f) == ["Q0", "Q1"]
    bad = _prompt_parquet(tmp_path / "b.parquet", [[{"role": "user", "content": "Q0"}], [sys_msg]])
    with pytest.raises(ValueError, match=r"b\.parquet: row 1"):
        sd.question_texts(bad)
    pd.DataFrame({"question": ["x"]}).to_parquet(tmp_path / "c.parquet")
    with pytest.raises(ValueError, match="no 'prompt' column"):
        sd.question_texts(tmp_path / "c.parquet")




# --------------------------------------------------------------------------- rounds + adapter training


def test_write_read_rounds_round_trip_and_errors(tmp_path):
    f = tmp_path / "r.jsonl"
    sd.write_round(f, 3, [7, 9], ["q7", "q9"], [0.25, 1.0], 8)
    sd.write_round(f, 5, [7], ["q7"], [0], [4])
    recs = sd.read_rounds([f])
    assert recs == [{"step": 3, "index": 7, "prompt": "q7", "difficulty": 0.25, "n": 8},
                    {"step": 3, "index": 9, "prompt": "q9", "difficulty": 1.0, "n": 8},
                    {"step": 5, "index": 7, "prompt": "q7", "difficulty": 0.0, "n": 4}]
    with pytest.raises(ValueError, match="lengths differ"):
        sd.write_round(f, 1, [1, 2], ["a"], [0.5, 0.5], 8)
    with pytest.raises(ValueError, match="not in"):
        sd.write_round(f, 1, [1], ["a"], [1.5], 8)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"step": 1, "index": 0, "prompt": "a", "difficulty": 0.5, "n": 8}\n\n{"step": 1, oops\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: malformed"):
        sd.read_rounds(bad)
    bad.write_text('{"step": 1, "index": 0, "prompt": "a", "n": 8}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: .*'difficulty'"):
        sd.read_rounds(bad)
    bad.write_text('{"step": 1, "index": 0, "prompt": "a", "difficulty": 2.0, "n": 8}\n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:1"):
        sd.read_rounds(bad)
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        sd.read_rounds(tmp_path / "missing.jsonl")


# ----------------------------------------------------------------------------- reference rollouts
class FakeRolloutTQ:
    """TransferQueue's ``train`` partition as the reference rollouts use it (``kv_batch_put`` of
    the prompts, ``kv_list``, ``kv_batch_get`` of the rows' ``extra_fields``, ``kv_clear``)."""

    def __init__(self):
        self.tags: dict[str, dict] = {}
        self.extra: dict[str, dict] = {}
        self.puts: list[tuple[list[str], str, list[dict]]] = []
        self.cleared: list[str] = []

    def kv_batch_put(self, keys, partition_id, fields=None, tags=None):
        self.puts.append((list(keys), partition_id, [dict(t) for t in tags]))
        self.tags.update({k: dict(t) for k, t in zip(keys, tags, strict=True)})

    def kv_list(self, partition_id):
        return {partition_id: {k: dict(t) for k, t in self.tags.items()}}

    def kv_batch_get(self, keys, partition_id, select_fields=None):
        from verl.utils.tensordict_utils import list_of_dict_to_tensordict

        assert partition_id == "train" and select_fields == ["extra_fields"]
        return list_of_dict_to_tensordict([{"extra_fields": self.extra[k]} for k in keys])

    def kv_clear(self, keys, partition_id):
        for k in keys:
            self.tags.pop(k)
            self.cleared.append(k)


class FakeAgentLoop:
    """verl's agent-loop manager: rolls out each prompt ``__rollout_n__`` times; question i's
    responses are correct for the first ``correct[i]`` of them; ``fail`` questions fail."""

    def __init__(self, tq, correct: dict[int, int], fail=(), finish=True):
        self.tq, self.correct, self.fail, self.finish = tq, correct, set(fail), finish
        self.batches = []

    def generate_sequences(self, batch):
        self.batches.append(batch)
        for uid, index, n in zip(batch["uid"], batch["index"].tolist(), batch["__rollout_n__"], strict=True):
            if not self.finish:
                self.tq.tags[uid]["status"] = "running"
                continue
            self.tq.tags[uid]["status"] = "failure" if index in self.fail else "finished"
            if index in self.fail:
                continue
            for j in range(n):
                key = f"{uid}_0_{j}"
                self.tq.tags[key] = {"status": "finished"}
                self.tq.extra[key] = {"reward_extra_info": {"acc": float(j < self.correct[index]), "pred": "x"}}


@pytest.fixture
def rollout_env(monkeypatch):
    import transfer_queue
    from verl.utils import tensordict_utils as tu

    fake = FakeRolloutTQ()
    for name in ("kv_batch_put", "kv_list", "kv_batch_get", "kv_clear"):
        monkeypatch.setattr(transfer_queue, name, getattr(fake, name))
    uids = iter(f"uid{i}" for i in range(1000))

    def collate_rows(dataset, indices, given=None):  # verl's collation, reduced to the index and the uids
        return tu.get_tensordict({"index": torch.tensor(indices),
                                  "uid": np.array(given or [next(uids) for _ in indices], dtype=object)})

    monkeypatch.setattr(sd, "collate_rows", collate_rows)
    return fake


def test_rollout_accuracy_through_the_agent_loop(rollout_env):
    loop = FakeAgentLoop(rollout_env, correct={3: 1, 5: 4, 8: 0}, fail={8})
    h = Handles(config=TRAINER_CONFIG, step=6, dataset=FakeDataset(), agent_loop_manager=loop)
    accs = sd.rollout_accuracy(h, [5, 3, 8], n=4, poll_interval=0.0)
    assert accs == [[1.0] * 4, [1.0, 0.0, 0.0, 0.0], []]  # in the order asked; the failed question: none
    (batch,) = loop.batches
    assert batch["global_steps"] == 6 and list(batch["__rollout_n__"]) == [4, 4, 4]
    (keys, partition, tags), = rollout_env.puts
    assert keys == list(batch["uid"]) and partition == "train"
    assert tags == [{"is_prompt": True, "status": "pending", "global_steps": 6}] * 3
    assert rollout_env.tags == {}  # prompts and rows cleared: the partition is empty between steps
    assert len(rollout_env.cleared) == 3 + 8


def test_rollout_accuracy_names_reference_prompts_deterministically(rollout_env):
    from recipe.stages.rows import make_uids

    loop = FakeAgentLoop(rollout_env, correct={3: 1, 5: 4})
    h = Handles(config=TRAINER_CONFIG, step=6, dataset=FakeDataset(), agent_loop_manager=loop,
                new_uids=lambda n, kind: make_uids(kind, 6, 0, n))
    assert sd.rollout_accuracy(h, [5, 3], n=4, poll_interval=0.0) == [[1.0] * 4, [1.0, 0.0, 0.0, 0.0]]
    (batch,) = loop.batches
    assert list(batch["uid"]) == ["r6-0", "r6-1"]


def test_rollout_accuracy_errors(rollout_env):
    loop = FakeAgentLoop(rollout_env, correct={1: 1})
    h = Handles(config=TRAINER_CONFIG, step=1, dataset=FakeDataset(), agent_loop_manager=loop)
    with pytest.raises(RuntimeError, match=r"dots\.metric='correct' is not among the reward function's outputs"):
        sd.rollout_accuracy(h, [1], n=2, metric="correct", poll_interval=0.0)
    stuck = FakeAgentLoop(rollout_env, correct={}, finish=False)  # its groups never finish
    h = Handles(config=TRAINER_CONFIG, step=1, dataset=FakeDataset(), agent_loop_manager=stuck)
    with pytest.raises(TimeoutError, match="1 of 1 groups unfinished"):
        sd.rollout_accuracy(h, [2], n=2, poll_interval=0.0, timeout_s=0.0)
