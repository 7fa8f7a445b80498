"""Tests of the DOTS glue (recipe/selection.py) and the trainer's ``dots/effective_ratio``
(recipe.trainer.effective_ratio), without Ray or a verl run.

The trainer is faked (a dataset of N = 40 questions in 4 clusters), the embedding model is
replaced by one-hot cluster embeddings, the reference rollouts by synthetic accuracies
(question i has a known difficulty), and collation by the identity on indices.
"""

from __future__ import annotations

import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

import recipe.dots
import recipe.selection as sel
from recipe.selection import DotsConfig, DotsStage
from recipe.trainer import effective_ratio

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
    """The fakes plus call logs (``embed_calls``: texts per call, ``ref_calls``: reference indices)."""

    def __init__(self, monkeypatch, n=N, fail=()):
        self.embed_calls: list[list[str]] = []
        self.ref_calls: list[list[int]] = []
        self.fail = set(fail)
        self.trainer = SimpleNamespace(train_dataset=FakeDataset(n), global_steps=1)
        monkeypatch.setattr(recipe.dots, "embed_questions", self.embed)
        monkeypatch.setattr(sel, "rollout_accuracy", self.rollout_accuracy)
        monkeypatch.setattr(sel, "collate_rows", lambda trainer, idx: list(idx))

    def embed(self, texts, model_path, cache_dir, batch_size=32, max_length=512):
        assert model_path == "/models/policy" and cache_dir == "/cache/dots"
        self.embed_calls.append(list(texts))
        emb = np.zeros((len(texts), CLUSTERS), dtype=np.float32)
        for row, text in enumerate(texts):
            emb[row, cluster(int(text.split()[-1]))] = 1.0
        return emb

    def rollout_accuracy(self, trainer, indices, n, metric="acc"):
        assert trainer is self.trainer and n == G and metric == "acc"
        self.ref_calls.append(list(indices))
        return [[] if i in self.fail else [1.0] * n_correct(i) + [0.0] * (G - n_correct(i)) for i in indices]


TRAINER_CONFIG = SimpleNamespace(actor_rollout_ref=SimpleNamespace(model=SimpleNamespace(path="/models/policy")))


def make_stage(**kw) -> DotsStage:
    node = {"enable": True, "every": 2, "ref_size": 20, "ref_samples": G, "holdout": 0.25, "tau": 1e-3,
            "cache_dir": "/cache/dots", "seed": 0, **kw}
    return DotsStage(DotsConfig.from_config(node), TRAINER_CONFIG)


# ----------------------------------------------------------------------------- DotsConfig
def test_config_defaults():
    cfg = DotsConfig.from_config(None)
    assert cfg == DotsConfig() == DotsConfig.from_config({})
    assert (cfg.enable, cfg.every, cfg.ref_size, cfg.ref_samples, cfg.holdout, cfg.tau, cfg.target) == (
        False, 2, 256, 8, 0.25, 1e-3, 0.5)
    assert (cfg.encoder, cfg.adapter, cfg.rounds_file, cfg.metric, cfg.seed) == (None, None, None, "acc", 0)


def test_config_from_omegaconf_node():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"dots": {"enable": True, "every": 3, "cache_dir": "${root}/c"}, "root": "/r"}).dots
    cfg = DotsConfig.from_config(node)
    assert cfg.enable is True and cfg.every == 3 and cfg.cache_dir == "/r/c"


def test_config_unknown_key_named():
    with pytest.raises(ValueError, match=r"unknown keys \['evry'\]"):
        DotsConfig.from_config({"evry": 2})


@pytest.mark.parametrize("key,value", [("every", 0), ("tau", 0), ("tau", -1e-3), ("holdout", 1), ("holdout", -0.1),
                                       ("ref_size", 1), ("ref_samples", 0), ("target", 1.5)])
def test_config_out_of_range_names_key(key, value):
    with pytest.raises(ValueError, match=rf"dots\.{key}={value!r} is out of range"):
        DotsConfig.from_config({key: value})


@pytest.mark.parametrize("key,value", [("every", "2"), ("ref_size", 2.5)])
def test_config_wrong_type_names_key(key, value):
    with pytest.raises(ValueError, match=rf"dots\.{key}"):
        DotsConfig.from_config({key: value})


def test_config_edges_accepted():
    cfg = DotsConfig.from_config({"every": 1, "holdout": 0.0, "ref_size": 2, "ref_samples": 1, "target": 1.0})
    assert (cfg.every, cfg.holdout, cfg.ref_size, cfg.ref_samples, cfg.target) == (1, 0.0, 2, 1, 1.0)


# ----------------------------------------------------------------------------- DotsStage
def test_setup_embeds_user_messages_once(monkeypatch):
    env = Env(monkeypatch)
    stage = make_stage()
    stage.setup(env.trainer)
    stage.setup(env.trainer)
    assert env.embed_calls == [[f"question {i}" for i in range(N)]]  # the user message, once
    assert stage.emb.shape == (N, CLUSTERS) and stage.selector.num_questions == N
    assert stage.encoder == "/models/policy"
    assert make_stage(encoder="/models/enc").encoder == "/models/enc"


def test_first_round_measures_and_keeps_reference_difficulty(monkeypatch):
    env = Env(monkeypatch)
    stage = make_stage()
    metrics = stage.maybe_round(env.trainer, 1)
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
    metrics = make_stage().maybe_round(env.trainer, 1)
    assert "dots/pred_pearson" in metrics  # holdout 0.25 * 20 = 5 >= 3
    assert metrics["dots/pred_pearson"] > 0.8
    # too few held out (round(0.1 * 20) = 2 < 3): no Pearson
    env2 = Env(monkeypatch)
    assert "dots/pred_pearson" not in make_stage(holdout=0.1).maybe_round(env2.trainer, 1)


def test_next_batch_closest_to_target_and_no_repeat_within_epoch(monkeypatch):
    env = Env(monkeypatch)
    stage = make_stage()
    stage.maybe_round(env.trainer, 1)
    dist = np.abs(stage.pred - 0.5)
    first = stage.next_batch(env.trainer, 4)
    assert isinstance(first, list) and len(first) == 4 == len(set(first))
    kth = np.sort(dist)[3]
    assert max(dist[first]) <= kth + 1e-9, (first, dist[first], kth)  # the 4 closest to 0.5 (tau 1e-3)
    assert all(cluster(i) == 2 for i in first)  # the cluster of difficulty ~0.5
    assert stage.step_metrics() == {"dots/selected_mean_difficulty": pytest.approx(float(np.mean(stage.pred[first])))}
    assert stage.step_metrics() == {}
    served = list(first)
    for _ in range(N // 4 - 1):
        served += stage.next_batch(env.trainer, 4)
    assert sorted(served) == list(range(N))  # one epoch: every question once, none repeated
    d = dist[served]
    assert np.all(np.diff(d) >= -1e-2), d  # served in priority order (ties within 1e-2 may swap)
    nxt = stage.next_batch(env.trainer, 4)  # epoch 2 starts again at the closest
    assert max(dist[nxt]) <= kth + 1e-9
    assert len(env.ref_calls) == 1  # serving never triggers a round once predictions exist


def test_next_batch_before_any_round_runs_one(monkeypatch):
    env = Env(monkeypatch)
    env.trainer.global_steps = 5
    stage = make_stage()
    idx = stage.next_batch(env.trainer, 3)
    assert len(env.ref_calls) == 1 and stage.rounds == 1 and stage.last_round_step == 5 and len(idx) == 3


def test_maybe_round_every_steps(monkeypatch, tmp_path):
    env = Env(monkeypatch)
    rounds_file = tmp_path / "runs" / "dots_rounds.jsonl"
    stage = make_stage(every=2, rounds_file=str(rounds_file))
    m1 = stage.maybe_round(env.trainer, 1)
    assert m1["dots/rounds"] == 1.0 and len(env.ref_calls) == 1
    m2 = stage.maybe_round(env.trainer, 2)  # step + 1 < every: no round
    assert m2 == {"dots/rounds": 1.0} and len(env.ref_calls) == 1
    m3 = stage.maybe_round(env.trainer, 3)  # step + every
    assert m3["dots/rounds"] == 2.0 and len(env.ref_calls) == 2 and stage.last_round_step == 3
    assert env.ref_calls[0] != env.ref_calls[1]  # a fresh random reference set
    assert stage.maybe_round(env.trainer, 4) == {"dots/rounds": 2.0}
    lines = [json.loads(x) for x in rounds_file.read_text().splitlines()]
    assert len(lines) == 2 * 20  # K lines per round
    for rec, (step, i) in zip(lines, [(1, i) for i in env.ref_calls[0]] + [(3, i) for i in env.ref_calls[1]]):
        assert rec == {"step": step, "index": i, "prompt": f"question {i}", "difficulty": true_difficulty(i), "n": G}


def test_failed_reference_questions_are_left_out(monkeypatch):
    env = Env(monkeypatch, fail=set(range(0, N, 2)))  # every even question's rollouts fail
    stage = make_stage()
    metrics = stage.maybe_round(env.trainer, 1)
    ok = [i for i in env.ref_calls[0] if i % 2]
    assert metrics["dots/ref_difficulty_mean"] == pytest.approx(float(np.mean([true_difficulty(i) for i in ok])))
    for i in ok:
        assert stage.pred[i] == true_difficulty(i)
    env_all = Env(monkeypatch, fail=set(range(N)))
    with pytest.raises(RuntimeError, match="fewer than 2 questions came back"):
        make_stage().maybe_round(env_all.trainer, 1)


def test_state_round_trip_serves_the_same_questions(monkeypatch):
    env = Env(monkeypatch)
    a = make_stage()
    a.maybe_round(env.trainer, 1)
    a.next_batch(env.trainer, 4)
    a.next_batch(env.trainer, 4)
    state = a.state_dict()
    json.dumps(state)  # plain data (saved with torch.save in recipe_state.pt)
    b = make_stage()
    b.load_state_dict(state)  # before setup: applied when the dataset is embedded
    assert b.pred is None
    b.setup(env.trainer)
    assert np.array_equal(b.pred, a.pred) and (b.rounds, b.last_round_step) == (1, 1)
    for _ in range(12):  # across the epoch boundary (40 questions, 8 already served)
        assert b.next_batch(env.trainer, 4) == a.next_batch(env.trainer, 4)
    # the reference draws continue identically too
    a.maybe_round(env.trainer, 3)
    b.maybe_round(env.trainer, 3)
    assert env.ref_calls[-1] == env.ref_calls[-2] and np.array_equal(a.pred, b.pred)
    # a stage restored after setup applies the state at once
    c = make_stage()
    c.setup(env.trainer)
    c.load_state_dict(a.state_dict())
    assert np.array_equal(c.pred, a.pred) and c.next_batch(env.trainer, 4) == a.next_batch(env.trainer, 4)
    c.load_state_dict({})  # DOTS was off in the checkpoint: ignored
    assert c.rounds == 2


def test_state_of_another_dataset_is_rejected(monkeypatch):
    env = Env(monkeypatch)
    a = make_stage()
    a.maybe_round(env.trainer, 1)
    small = Env(monkeypatch, n=30)
    b = make_stage()
    b.load_state_dict(a.state_dict())
    with pytest.raises(ValueError, match="40 predictions, the training set 30 questions"):
        b.setup(small.trainer)


def test_ref_size_larger_than_dataset(monkeypatch):
    env = Env(monkeypatch, n=10)
    with pytest.raises(ValueError, match=r"dots\.ref_size=20 exceeds the 10 training questions"):
        make_stage(ref_size=20).setup(env.trainer)


# ----------------------------------------------------------------------------- effective_ratio
def _fields(*accs):
    return [{"reward_extra_info": {"acc": a, "pred": "7"}} for a in accs]


def test_effective_ratio_hand_values():
    # groups: [1, 0] mixed, [1, 1] all correct, [0, 0] all wrong, [0.5, 0.5] partial credit (mixed)
    uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    fields = _fields(1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5)
    assert effective_ratio(uids, fields) == 0.5
    assert effective_ratio(uids[:6], fields[:6]) == pytest.approx(1 / 3)
    assert effective_ratio(["a", "b", "a"], _fields(True, False, False)) == 0.5  # bools; interleaved uids
    # samples without acc (or not a dict) do not count; a group with none of them is not a group here
    mixed = _fields(1.0, 1.0) + [{"reward_extra_info": {"score": 1.0}}, None, {}]
    assert effective_ratio(["a", "a", "e", "e", "f"], mixed) == 0.0
    assert effective_ratio(["a", "a", "e", "e"], _fields(1.0, 0.0) + [{"reward_extra_info": {}}] * 2) == 1.0


def test_effective_ratio_none_without_acc():
    assert effective_ratio([], []) is None
    assert effective_ratio(["a", "b"], [{"reward_extra_info": {"score": 1.0}}, {}]) is None


def test_effective_ratio_length_mismatch():
    with pytest.raises(ValueError):
        effective_ratio(["a", "b"], _fields(1.0))


# sanity of the synthetic set the DOTS tests rely on (so a broken fixture cannot pass silently)
def test_synthetic_difficulties():
    d = [true_difficulty(i) for i in range(N)]
    assert min(d) > 0 and max(d) < 1
    means = [np.mean([d[i] for i in range(N) if cluster(i) == c]) for c in range(CLUSTERS)]
    assert np.allclose(means, [0.875, 0.625, 0.5, 0.25], atol=0.01)  # jitter -1, 0, +1: mean shift 0.1 / G
    assert math.isclose(true_difficulty(2), 0.5 + 1 / G)  # i = 2: cluster 2, jitter -1 correct
    assert true_difficulty(6) == 0.5  # i = 6: jitter 0
