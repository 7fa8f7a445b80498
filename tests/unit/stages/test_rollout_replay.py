"""Tests of the rollout-replay stage (recipe/stages/rollout_replay.py) through the hooks
verl's trainer calls, without Ray or a verl run.

TransferQueue is replaced by :class:`FakeTQ`, an in-memory key -> fields store with the
three calls the stage makes; the sampler is the real
:class:`~recipe.stages.group_filter.GroupFilterSampler` with its group filter faked (it
hands back the step's fresh rows); verl's agent loop and trainer stages are played by the
tests (they put the rollout fields, then ``old_log_probs`` / ``advantages``), and the
trainer's part by :func:`plan` (``prepare_step``: the stage's ``plan`` sets the sampler's
fresh size) and :func:`call` (a hook with :class:`~recipe.stages.base.Handles` and the
step's metrics). Expected values are computed by hand (python ``math`` on explicit lists),
not with the module's helpers. ``configure_replay``: tests/unit/config/test_startup.py.
"""

from __future__ import annotations

import copy
import hashlib
import io
import math

import numpy as np
import pytest
import torch
from transfer_queue import KVBatchMeta

import recipe.stages.rollout_replay as rr
from recipe.algos.rollout_replay import ReplayGroup, RolloutReplayBuffer
from recipe.config import ReplayConfig
from recipe.stages.base import Handles, SampleContext, Stage, build_stages
from recipe.stages.group_filter import GroupFilterSampler
from recipe.stages.rollout_replay import RolloutReplayStage, prompt_key, state_fingerprint
from recipe.stages.rows import REPLAYED, SKIP_UPDATE

from tests.unit.stages.fakes import P, FakeTQ


# ----------------------------------------------------------------------------- fakes
@pytest.fixture
def fake_tq(monkeypatch):
    fake = FakeTQ()
    monkeypatch.setattr(rr, "tq", fake)
    return fake


def make_stage(config=None, **replay) -> RolloutReplayStage:
    """The stage as the trainer builds it from the ``replay`` node (``Stage.load_config``) and
    the run ``config``. An absolute ``capacity`` turns ``capacity_ratio`` off; without either
    (and no config to size by) C = 256. ``warmup_steps`` defaults to 0 here (replay from step
    2, the step layout of these tests); the warm-up has its own tests."""
    if "capacity" in replay:
        replay.setdefault("capacity_ratio", None)
    elif config is None:
        replay.update(capacity=256, capacity_ratio=None)
    replay.setdefault("warmup_steps", 0)
    return RolloutReplayStage(ReplayConfig.from_config(replay), config)


def make_sampler(*stages) -> GroupFilterSampler:
    """The sampler as verl's V1 trainer builds it (no group filter), running ``stages``."""
    sampler = GroupFilterSampler(
        trainer_mode="sync", trainer_config={}, max_off_policy_threshold=None, max_off_policy_strategy="drop",
        sampler_kwargs={"group_filter": None}, refill_fn=None,
    )
    sampler.stages = list(stages)
    return sampler


def plan(stage, batch_size, step=1) -> int:
    """The trainer's ``prepare_step``: the stage's ``plan`` hook gives this step's fresh prompts."""
    n_fresh, metrics = stage.plan(Handles(config=None, step=step), batch_size)
    assert metrics == {}
    return n_fresh


def call(hook, batch, step=1) -> dict:
    """A trainer-time hook called as RecipeTrainer does; returns the metrics it added."""
    metrics: dict = {}
    assert hook(Handles(config=None, step=step), batch, metrics) is None
    return metrics


def rollout_rows(uid: str, prompt: list[int], accs: list[float], lengths: list[int]) -> dict[str, dict]:
    """key -> the fields verl's agent loop puts for one group (n = len(accs) responses)."""
    rows = {}
    for j, (acc, t) in enumerate(zip(accs, lengths, strict=True)):
        rows[f"{uid}_{j}_0"] = {
            "prompts": torch.tensor(prompt, dtype=torch.int64),
            "responses": torch.arange(100 + j, 100 + j + t, dtype=torch.int64),
            "response_mask": torch.ones(t, dtype=torch.int64),
            "rollout_log_probs": torch.full((t,), -0.25 - j, dtype=torch.float32),
            "extra_fields": {"reward_extra_info": {"acc": float(acc), "pred": "42"}},
        }
    return rows


def run_sample(stage, fake, monkeypatch, step, fresh: dict[str, dict], batch_size, n_fresh=None, extra_tags=None):
    """verl's ``sample`` call of one step: the agent loop's rows are in TransferQueue and the
    group filter (faked) hands back exactly those keys; ``n_fresh`` is what the trainer set
    from :func:`plan` (None: not planned, the whole batch)."""
    fake.clear_partition()
    for k, row in fresh.items():
        fake.data.setdefault(P, {})[k] = dict(row)
    tags = [dict({"status": "finished", "global_steps": step}, **(extra_tags or {}).get(k, {})) for k in fresh]
    prepared = KVBatchMeta(partition_id=P, keys=list(fresh), tags=tags)
    calls = []

    def fake_filter_sample(self, global_steps, partition_id, n):
        assert (global_steps, partition_id) == (step, P)
        calls.append(n)
        return prepared, {"filter/kept_groups": n}

    monkeypatch.setattr(GroupFilterSampler, "filter_sample", fake_filter_sample)
    sampler = make_sampler(stage)
    sampler.fresh_size = n_fresh
    batch, metrics = sampler.sample(step, P, batch_size)
    assert sampler.fresh_size is None  # one step's setting
    return batch, metrics, calls


# step 1: four fresh groups, two of them mixed; lengths differ inside a group (jagged)
STEP1 = {
    **rollout_rows("ua", [1, 2, 3], [1.0, 0.0], [2, 3]),
    **rollout_rows("ub", [4, 5], [0.0, 1.0], [1, 2]),
    **rollout_rows("uc", [6], [1.0, 1.0], [2, 2]),  # all correct: not stored
    **rollout_rows("ud", [7, 8], [0.0, 0.0], [3, 1]),  # all wrong: not stored
}
OLD1 = {  # pi_old written by verl at step 1 = the behaviour log-probs mu of the stored groups
    "ua_0_0": [-1.0, -2.0], "ua_1_0": [-0.5, -0.5, -3.0],
    "ub_0_0": [-1.0], "ub_1_0": [-2.0, -0.1],
    "uc_0_0": [-0.3, -0.3], "uc_1_0": [-0.2, -0.2],
    "ud_0_0": [-1.0, -1.0, -1.0], "ud_1_0": [-4.0],
}
ADV1 = {k: [0.5 * (i + 1)] * len(v) for i, (k, v) in enumerate(OLD1.items())}
# step 2: two fresh groups (new prompts)
STEP2 = {
    **rollout_rows("ue", [9, 9], [1.0, 0.0], [2, 1]),
    **rollout_rows("uf", [10], [0.0, 1.0], [1, 1]),
}
# pi_old recomputed at step 2 for the replayed rows (and the fresh ones)
OLD2 = {
    "ua_0_0": [-0.5, -2.5], "ua_1_0": [-0.5, 0.5, -1.0],
    "ub_0_0": [-3.0], "ub_1_0": [-2.0, -0.1],
    "ue_0_0": [-0.7, -0.7], "ue_1_0": [-0.9], "uf_0_0": [-0.4], "uf_1_0": [-0.6],
}
REPLAYED_KEYS = ["ua_0_0", "ua_1_0", "ub_0_0", "ub_1_0"]
#: The weight statistics of a step that replays nothing: none (no fake on-policy values).
ON_POLICY: dict = {}


def run_step1(stage, fake, monkeypatch):
    """Step 1 (all fresh), through the actor update; returns (sample batch, metrics, store metrics)."""
    n_fresh = plan(stage, 4, step=1)
    assert n_fresh == 4
    batch, metrics, calls = run_sample(stage, fake, monkeypatch, 1, STEP1, 4, n_fresh)
    assert calls == [4]
    fake.write("old_log_probs", OLD1)
    assert call(stage.after_old_log_prob, batch) == ON_POLICY
    fake.write("advantages", ADV1)
    assert call(stage.after_advantage, batch) == {}
    stored = call(stage.after_update_actor, batch, step=1)
    return batch, metrics, stored


def run_step2_sample(stage, fake, monkeypatch, fresh=STEP2):
    n_fresh = plan(stage, 4, step=2)
    assert n_fresh == 2
    batch, metrics, calls = run_sample(stage, fake, monkeypatch, 2, fresh, 4, n_fresh)
    assert calls == [2]
    return batch, metrics


# ----------------------------------------------------------------------------- prompt_key
def test_prompt_key():
    want = hashlib.sha1(np.array([1, 2, 3], dtype=np.int64).tobytes()).hexdigest()
    assert prompt_key(torch.tensor([1, 2, 3])) == want
    assert prompt_key(torch.tensor([1, 2, 3], dtype=torch.int32)) == want  # dtype-independent
    assert prompt_key(torch.tensor([1, 2, 4])) != want
    assert prompt_key(torch.tensor([3, 2, 1])) != want


# ----------------------------------------------------------------------------- fingerprint
def _payload(keys, lengths, seed, lp_dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return {
        "keys": list(keys),
        "tags": [{"status": "finished", "global_steps": 1} for _ in keys],
        "fields": [{"prompts": torch.tensor([seed, 2, 3]), "responses": torch.arange(t) + seed,
                    "rollout_log_probs": -torch.rand(t, generator=g).to(torch.bfloat16),
                    "extra_fields": {"reward_extra_info": {"acc": float(i % 2)}}}
                   for i, t in enumerate(lengths)],
        "behaviour_log_probs": [-torch.rand(t, generator=g).to(lp_dtype) for t in lengths],
        "advantages": [torch.full((t,), 0.5 - i) for i, t in enumerate(lengths)],
    }


def _buffer(groups=None, steps=(1, 2, 3)):
    buf = RolloutReplayBuffer(ReplayConfig(enable=True, capacity=8, capacity_ratio=None))
    specs = groups or [("p0", "u0", [2, 3]), ("p1", "u1", [1, 4]), ("p2", "u2", [3, 3])]
    for (pk, uid, lengths), step in zip(specs, steps):
        keys = [f"{uid}_{j}_0" for j in range(len(lengths))]
        buf.add([ReplayGroup(pk, uid, step, 0.5, _payload(keys, lengths, seed=int(uid[1:])))], step)
    return buf


def test_fingerprint_equal_after_torch_save_load_round_trip():
    buf = _buffer()
    state = buf.state_dict()
    assert any(f["rollout_log_probs"].dtype == torch.bfloat16 for g in state["groups"] for f in g["payload"]["fields"])
    blob = io.BytesIO()
    torch.save(state, blob)
    blob.seek(0)
    loaded = torch.load(blob, weights_only=False)  # as RecipeTrainer._load_checkpoint
    assert state_fingerprint(loaded) == state_fingerprint(state)
    restored = RolloutReplayBuffer(ReplayConfig(enable=True, capacity=8, capacity_ratio=None))
    restored.load_state_dict(loaded)
    assert state_fingerprint(restored.state_dict()) == state_fingerprint(state)
    # deterministic and not trivially constant
    assert state_fingerprint(_buffer().state_dict()) == state_fingerprint(state)
    empty = hashlib.sha1().hexdigest()
    assert state_fingerprint({}) == state_fingerprint(None) == empty != state_fingerprint(state)


def _mutated(fn):
    state = _buffer().state_dict()
    fn(state)
    return state_fingerprint(state)


@pytest.mark.parametrize("name,mutate", [
    ("behaviour log-prob", lambda s: s["groups"][1]["payload"]["behaviour_log_probs"][1].__setitem__(2, -9.0)),
    ("advantage", lambda s: s["groups"][2]["payload"]["advantages"][0].__setitem__(0, 0.25)),
    ("bf16 field tensor", lambda s: s["groups"][0]["payload"]["fields"][1]["rollout_log_probs"].__setitem__(0, -2.0)),
    ("response ids", lambda s: s["groups"][0]["payload"]["fields"][0]["responses"].__setitem__(1, 77)),
    ("non-tensor field", lambda s: s["groups"][0]["payload"]["fields"][0]["extra_fields"]["reward_extra_info"]
     .__setitem__("acc", 1.0)),
    ("step", lambda s: s["groups"][1].__setitem__("step", 5)),
    ("key", lambda s: s["groups"][1]["payload"]["keys"].__setitem__(0, "u1_9_0")),
    ("uid", lambda s: s["groups"][0].__setitem__("uid", "zz")),
    ("prompt", lambda s: s["groups"][0].__setitem__("prompt_key", "p9")),
    ("mean reward", lambda s: s["groups"][0].__setitem__("mean_reward", 0.25)),
    ("order", lambda s: s["groups"].reverse()),
    ("dropped group", lambda s: s["groups"].pop()),
    ("dtype", lambda s: s["groups"][0]["payload"]["behaviour_log_probs"].__setitem__(
        0, s["groups"][0]["payload"]["behaviour_log_probs"][0].to(torch.float64))),
])
def test_fingerprint_changes_with_every_part_of_the_state(name, mutate):
    assert _mutated(mutate) != state_fingerprint(_buffer().state_dict()), name


def test_fingerprint_sees_where_one_response_ends():
    state = _buffer().state_dict()
    a, b = state["groups"][0]["payload"]["behaviour_log_probs"]  # lengths 2 and 3
    moved = copy.deepcopy(state)
    moved["groups"][0]["payload"]["behaviour_log_probs"] = [torch.cat([a, b[:1]]), b[1:].clone()]  # 3 and 2
    # same concatenated values: only the per-tensor boundaries (the dtype prefix of each tensor) differ
    assert state_fingerprint(moved) != state_fingerprint(state)


# ----------------------------------------------------------------------------- stage: selection / plan
def test_stage_registration_and_config_node():
    assert issubclass(RolloutReplayStage, Stage)
    assert (RolloutReplayStage.name, RolloutReplayStage.node, RolloutReplayStage.order) == (
        "rollout_replay", "replay", 20)
    cfg = RolloutReplayStage.load_config({"replay": {"enable": True, "capacity": 8, "capacity_ratio": None}})
    assert isinstance(cfg, ReplayConfig) and cfg.capacity == 8 and RolloutReplayStage.enabled(cfg, None)
    # the default: C = capacity_ratio 2 x the fresh groups of data.train_batch_size (round(0.5 x 6) = 3)
    config = {"replay": {"enable": True}, "data": {"train_batch_size": 6}}
    assert RolloutReplayStage(RolloutReplayStage.load_config(config), config).buffer.capacity == 6
    with pytest.raises(ValueError, match=r"replay\.capacity_ratio=2\.0 sizes the buffer .*data\.train_batch_size"):
        RolloutReplayStage(RolloutReplayStage.load_config(config), {"replay": {"enable": True}})
    assert not RolloutReplayStage.enabled(RolloutReplayStage.load_config({}), None)
    with pytest.raises(ValueError, match=r"replay\.capacity must be an integer > 0 or null, got 0"):
        RolloutReplayStage.load_config({"replay": {"capacity": 0}})
    s = make_stage(enable=True)
    assert s.replay_cfg is s.cfg and len(s.buffer) == 0 and s.state_dict()["groups"] == []


def test_disabled_replay_leaves_the_sampler_plain_group_filter(fake_tq, monkeypatch):
    """replay.enable=false: no rollout-replay stage is built; the sampler hands the group
    filter's batch through untouched and nothing is written to TransferQueue."""
    stages = build_stages({"replay": {"enable": False}})
    assert "rollout_replay" not in [st.name for st in stages]
    assert "rollout_replay" in [st.name for st in build_stages({"replay": {"enable": True},
                                                                "data": {"train_batch_size": 4}})]
    prepared = KVBatchMeta(partition_id=P, keys=list(STEP1), tags=[{"status": "finished"} for _ in STEP1])
    calls = []

    def fake_filter_sample(self, global_steps, partition_id, n):
        calls.append(n)
        return prepared, {"filter/kept_groups": n}

    monkeypatch.setattr(GroupFilterSampler, "filter_sample", fake_filter_sample)
    sampler = make_sampler(*[st for st in stages if type(st).sample is not Stage.sample])
    assert sampler.stages == []  # no enabled stage samples
    batch, metrics = sampler.sample(1, P, 4)
    assert calls == [4] and batch is prepared and metrics == {"filter/kept_groups": 4}
    assert fake_tq.puts == []


@pytest.mark.parametrize("delta,batch,fresh", [(0.5, 4, 2), (0.25, 8, 2), (0.5, 3, 2), (0.3, 5, 2), (1.0, 4, 4)])
def test_plan_all_fresh_until_buffer_holds_the_rest(delta, batch, fresh):
    s = make_stage(enable=True, fresh_fraction=delta, store_only_mixed=False)
    n_replay = batch - fresh
    for stored in range(n_replay):  # fewer than B - round(delta B) groups: all fresh
        assert len(s.buffer) == stored
        assert plan(s, batch) == batch and s._plan == (batch, 0)
        s.buffer.add([ReplayGroup(f"p{stored}", f"u{stored}", 1, 0.5)], 1)
    assert plan(s, batch) == fresh and s._plan == (fresh, n_replay)


# ----------------------------------------------------------------------------- stage: full steps
def test_store_fresh_adds_mixed_groups_with_pi_old_as_behaviour(fake_tq, monkeypatch):
    s = make_stage(enable=True, capacity=8)
    batch, metrics, stored = run_step1(s, fake_tq, monkeypatch)
    assert batch.keys == list(STEP1) and not any(REPLAYED in t for t in batch.tags)
    assert metrics == {"filter/kept_groups": 4, "replay/size": 0.0, "replay/capacity": 8.0, "replay/fresh_groups": 4.0,
                       "replay/replayed_groups": 0.0}
    assert stored == {"replay/stored": 2, "replay/evicted": 0, "replay/size": 2}
    ga, gb = s.buffer.groups
    assert (ga.uid, gb.uid) == ("ua", "ub") and ga.step == gb.step == 1
    assert ga.mean_reward == 0.5 and gb.mean_reward == 0.5
    assert ga.prompt_key == prompt_key(torch.tensor([1, 2, 3])) and gb.prompt_key == prompt_key(torch.tensor([4, 5]))
    for g in (ga, gb):
        p = g.payload
        assert p["keys"] == [f"{g.uid}_0_0", f"{g.uid}_1_0"]
        for k, mu, adv, row, tag in zip(p["keys"], p["behaviour_log_probs"], p["advantages"], p["fields"], p["tags"]):
            assert torch.equal(mu, torch.tensor(OLD1[k])), k
            assert torch.equal(adv, torch.tensor(ADV1[k])), k
            assert set(row) == {"prompts", "responses", "response_mask", "rollout_log_probs", "extra_fields"}
            assert torch.equal(row["responses"], STEP1[k]["responses"])
            assert row["extra_fields"] == STEP1[k]["extra_fields"]
            assert tag == {"status": "finished", "global_steps": 1}
    assert s._fresh == [] and s.store_fresh(batch, 1) == {}  # stored once


def test_store_all_groups_when_not_only_mixed(fake_tq, monkeypatch):
    s = make_stage(enable=True, store_only_mixed=False)
    _, _, stored = run_step1(s, fake_tq, monkeypatch)
    assert stored == {"replay/stored": 4, "replay/evicted": 0, "replay/size": 4}
    assert [(g.uid, g.mean_reward) for g in s.buffer.groups] == [("ua", 0.5), ("ub", 0.5), ("uc", 1.0), ("ud", 0.0)]


def test_store_fresh_fifo_capacity_reports_evictions(fake_tq, monkeypatch):
    s = make_stage(enable=True, store_only_mixed=False, capacity=3)
    _, _, stored = run_step1(s, fake_tq, monkeypatch)
    assert stored == {"replay/stored": 4, "replay/evicted": 1, "replay/size": 3}
    assert [g.uid for g in s.buffer.groups] == ["ub", "uc", "ud"]


def test_padding_and_skip_update_batches_are_not_stored(fake_tq, monkeypatch):
    s = make_stage(enable=True, store_only_mixed=False)
    rows = {**rollout_rows("ua", [1], [1.0, 0.0], [1, 1]), **rollout_rows("up", [2], [0.0, 1.0], [1, 1])}
    pad = {"up_0_0": {"is_padding": True}, "up_1_0": {"is_padding": True}}
    batch, _, _ = run_sample(s, fake_tq, monkeypatch, 1, rows, 2, extra_tags=pad)
    fake_tq.write("old_log_probs", {k: [-1.0] for k in rows})
    fake_tq.write("advantages", {k: [0.0] for k in rows})
    assert s.store_fresh(batch, 1)["replay/stored"] == 1 and [g.uid for g in s.buffer.groups] == ["ua"]

    s2 = make_stage(enable=True, store_only_mixed=False)
    skip = {k: {SKIP_UPDATE: True} for k in rows}
    batch, metrics, _ = run_sample(s2, fake_tq, monkeypatch, 1, rows, 2, extra_tags=skip)
    assert batch.keys == list(rows) and metrics["replay/replayed_groups"] == 0.0
    assert s2.store_fresh(batch, 1) == {} and len(s2.buffer) == 0
    # the hook itself, as the sampler calls it: a skipped batch comes back as it is
    s3 = make_stage(enable=True, store_only_mixed=False)
    ctx = SampleContext(step=1, partition_id=P, batch_size=2, forget=lambda keys: pytest.fail("nothing to forget"))
    metrics = {"filter/skipped_update": 1}
    assert s3.sample(ctx, batch, metrics) is batch and fake_tq.puts == []
    assert metrics["filter/skipped_update"] == 1 and metrics["replay/replayed_groups"] == 0.0


def test_store_fresh_missing_metric_names_replay_metric(fake_tq, monkeypatch):
    s = make_stage(enable=True, metric="correct")
    batch, _, _ = run_sample(s, fake_tq, monkeypatch, 1, STEP1, 4)
    fake_tq.write("old_log_probs", OLD1)
    fake_tq.write("advantages", ADV1)
    with pytest.raises(RuntimeError, match=r"replay\.metric='correct'.*\['acc', 'pred'\]"):
        s.store_fresh(batch, 1)


@pytest.mark.parametrize("correction", ["decoupled", "plain", "none"])
def test_replayed_groups_written_back_under_their_keys(fake_tq, monkeypatch, correction):
    s = make_stage(enable=True, correction=correction)
    run_step1(s, fake_tq, monkeypatch)
    batch, metrics = run_step2_sample(s, fake_tq, monkeypatch)
    assert batch.partition_id == P
    assert batch.keys[:4] == list(STEP2) and sorted(batch.keys[4:]) == REPLAYED_KEYS
    for k, tag in zip(batch.keys, batch.tags):
        if k in STEP2:
            assert tag == {"status": "finished", "global_steps": 2}
        else:  # the stored tags of step 1, flagged
            assert tag == {"status": "finished", "global_steps": 1, REPLAYED: True}
            assert s.is_replayed(k)
    assert not s.is_replayed("ue_0_0")
    assert metrics == {"filter/kept_groups": 2, "replay/size": 2.0, "replay/capacity": 256.0,
                       "replay/fresh_groups": 2.0, "replay/replayed_groups": 2.0, "replay/mean_age": 1.0,
                       "replay/max_age": 1.0}
    for k in REPLAYED_KEYS:  # TransferQueue holds the stored rows again (nothing of the stages)
        row = fake_tq.data[P][k]
        assert set(row) == {"prompts", "responses", "response_mask", "rollout_log_probs", "extra_fields"}
        assert torch.equal(row["responses"], STEP1[k]["responses"])
        assert row["extra_fields"] == STEP1[k]["extra_fields"]
        want = torch.tensor(OLD1[k]) if correction == "decoupled" else STEP1[k]["rollout_log_probs"]
        assert torch.equal(row["rollout_log_probs"], want), (k, correction)  # decoupled: mu
    assert fake_tq.tags[P]["ua_1_0"][REPLAYED] is True


def test_fresh_prompt_excludes_its_stored_group(fake_tq, monkeypatch):
    s = make_stage(enable=True)
    run_step1(s, fake_tq, monkeypatch)
    same_prompt = {**rollout_rows("ue", [1, 2, 3], [1.0, 0.0], [1, 1]), **rollout_rows("uf", [10], [0.0, 1.0], [1, 1])}
    batch, metrics = run_step2_sample(s, fake_tq, monkeypatch, fresh=same_prompt)
    assert batch.keys[4:] == ["ub_0_0", "ub_1_0"]  # ua has the prompt of the fresh group ue
    assert metrics["replay/replayed_groups"] == 1.0


def test_after_old_log_prob_decoupled_weights_and_unchanged_pi_old(fake_tq, monkeypatch):
    s = make_stage(enable=True, correction="decoupled", truncation=2.0)
    run_step1(s, fake_tq, monkeypatch)
    batch, _ = run_step2_sample(s, fake_tq, monkeypatch)
    fake_tq.write("old_log_probs", OLD2)
    metrics = call(s.after_old_log_prob, batch, step=2)
    ws = [min(math.exp(o - m), 2.0) for k in REPLAYED_KEYS for o, m in zip(OLD2[k], OLD1[k], strict=True)]
    # by hand: ua_0_0 [e^0.5 -> 1.6487, e^-0.5], ua_1_0 [1, e^1 -> 2 (cap), e^2 -> 2], ub_0_0 [e^-2], ub_1_0 [1, 1]
    assert len(ws) == 8
    mean = sum(ws) / 8
    assert metrics == pytest.approx({
        "replay/is_weight_mean": mean, "replay/is_weight_std": math.sqrt(sum((w - mean) ** 2 for w in ws) / 8),
        "replay/is_weight_min": math.exp(-2), "replay/is_weight_max": 2.0,
        "replay/is_weight_ess": sum(ws) ** 2 / (8 * sum(w * w for w in ws)),
        "replay/truncated_frac": 2 / 8}, rel=1e-6)  # e^1 and e^2 of ua_1_0 capped
    assert metrics["replay/is_weight_mean"] == pytest.approx(
        (math.exp(0.5) + math.exp(-0.5) + 1 + 2 + 2 + math.exp(-2) + 1 + 1) / 8, rel=1e-6)
    for k, v in OLD2.items():  # decoupled: verl's rollout correction does the rest
        assert fake_tq.get(k, "old_log_probs").tolist() == pytest.approx(v), k


def _verl_weights(fake, batch, threshold=math.inf):
    """verl's own decoupled token-level weights (``compute_rollout_correction_and_add_to_batch``
    of ``_compute_advantage``) over the step's rows as TransferQueue holds them: key -> [T_i]."""
    from verl.protocol import DataProto
    from verl.trainer.config.algorithm import RolloutCorrectionConfig
    from verl.trainer.ppo.rollout_corr_helper import compute_rollout_correction_and_add_to_batch

    pad = torch.nn.utils.rnn.pad_sequence
    lengths = [fake.get(k, "old_log_probs").numel() for k in batch.keys]
    tensors = {f: pad([fake.get(k, f).float() for k in batch.keys], batch_first=True)
               for f in ("old_log_probs", "rollout_log_probs")}
    tensors["response_mask"] = pad([torch.ones(n, dtype=torch.long) for n in lengths], batch_first=True)
    out, _ = compute_rollout_correction_and_add_to_batch(DataProto.from_dict(tensors=tensors),
                                                         RolloutCorrectionConfig.decoupled_token_is(threshold=threshold))
    return {k: out.batch["rollout_is_weights"][i, :n] for i, (k, n) in enumerate(zip(batch.keys, lengths))}


@pytest.mark.parametrize("rows", ["replayed", "all"])
def test_fresh_rows_weight_exactly_one_with_correction_rows_replayed(fake_tq, monkeypatch, rows):
    """correction_rows=replayed (public code): verl's weights are exactly 1 on every fresh token
    and pi_old / mu on replayed ones; correction_rows=all: fresh rows get pi_old / pi_rollout
    (here exp(-0.7 + 0.25) etc.: the agent loop's rollout_log_probs are -0.25 - j)."""
    s = make_stage(enable=True, correction="decoupled", correction_rows=rows)
    run_step1(s, fake_tq, monkeypatch)
    batch, _ = run_step2_sample(s, fake_tq, monkeypatch)
    fake_tq.write("old_log_probs", OLD2)
    call(s.after_old_log_prob, batch, step=2)
    w = _verl_weights(fake_tq, batch)
    for k in REPLAYED_KEYS:
        assert w[k].tolist() == pytest.approx([math.exp(o - m) for o, m in zip(OLD2[k], OLD1[k])], rel=1e-6), k
    for k in STEP2:
        if rows == "replayed":
            assert torch.equal(w[k], torch.ones(len(OLD2[k]))), k  # exactly 1, not ~1
            assert torch.equal(fake_tq.get(k, "rollout_log_probs"), fake_tq.get(k, "old_log_probs"))
        else:
            j = int(k.split("_")[1])
            assert w[k].tolist() == pytest.approx([math.exp(o + 0.25 + j) for o in OLD2[k]], rel=1e-6), k
            assert w[k].tolist() != [1.0] * len(OLD2[k])


def test_fresh_rows_weight_one_also_in_all_fresh_steps(fake_tq, monkeypatch):
    """verl's rollout correction is on in every step (configure_replay); in a step that replays
    nothing the fresh rows must still get weight exactly 1."""
    s = make_stage(enable=True, correction="decoupled")
    n_fresh = plan(s, 4, step=1)
    batch, _, _ = run_sample(s, fake_tq, monkeypatch, 1, STEP1, 4, n_fresh)
    fake_tq.write("old_log_probs", OLD1)
    assert call(s.after_old_log_prob, batch) == ON_POLICY
    assert all(torch.equal(v, torch.ones_like(v)) for v in _verl_weights(fake_tq, batch).values())


def test_warmup_steps_have_no_replayed_rows(fake_tq, monkeypatch):
    """replay.warmup_steps=2 (the public code's first round of mu = 2 steps): steps 1 and 2 are
    all fresh although the buffer holds enough groups after step 1; step 3 replays half."""
    s = make_stage(enable=True, warmup_steps=2, store_only_mixed=False, capacity=8)
    fresh_of = {1: STEP1, 2: {**rollout_rows("ue", [9, 9], [1.0, 0.0], [2, 1]),
                              **rollout_rows("uf", [10], [0.0, 1.0], [1, 1]),
                              **rollout_rows("ug", [11], [0.0, 1.0], [1, 1]),
                              **rollout_rows("uh", [12], [0.0, 1.0], [1, 1])},
                3: STEP2}
    for step in (1, 2, 3):
        n_fresh = plan(s, 4, step=step)
        assert n_fresh == (4 if step <= 2 else 2)
        batch, metrics, _ = run_sample(s, fake_tq, monkeypatch, step, fresh_of[step], 4, n_fresh)
        replayed = [k for k in batch.keys if s.is_replayed(k)]
        fake_tq.write("old_log_probs", {k: [-1.0] * len(fake_tq.get(k, "responses")) for k in batch.keys})
        weights = call(s.after_old_log_prob, batch, step=step)
        if step <= 2:
            assert replayed == [] and metrics["replay/replayed_groups"] == 0.0 and weights == ON_POLICY
            assert not any(REPLAYED in t for t in batch.tags)
        else:  # 2 of the 8 stored groups (4 of step 1, 4 of step 2): ages 1 or 2
            assert len(replayed) == 4 and metrics["replay/replayed_groups"] == 2.0
            assert 1.0 <= metrics["replay/mean_age"] <= metrics["replay/max_age"] <= 2.0
        fake_tq.write("advantages", {k: [0.0] * len(fake_tq.get(k, "responses")) for k in batch.keys})
        call(s.after_update_actor, batch, step=step)
        assert len(s.buffer) == min(8, 4 * step)


def test_after_old_log_prob_decoupled_no_truncation(fake_tq, monkeypatch):
    s = make_stage(enable=True, correction="decoupled")
    run_step1(s, fake_tq, monkeypatch)
    batch, _ = run_step2_sample(s, fake_tq, monkeypatch)
    fake_tq.write("old_log_probs", OLD2)
    got = call(s.after_old_log_prob, batch, step=2)["replay/is_weight_mean"]
    assert got == pytest.approx((math.exp(0.5) + math.exp(-0.5) + 1 + math.e + math.exp(2) + math.exp(-2) + 2) / 8,
                                rel=1e-6)


@pytest.mark.parametrize("truncation", [None, 2.0])
def test_after_old_log_prob_plain_anchors_replayed_rows(fake_tq, monkeypatch, truncation):
    s = make_stage(enable=True, correction="plain", truncation=truncation)
    run_step1(s, fake_tq, monkeypatch)
    batch, _ = run_step2_sample(s, fake_tq, monkeypatch)
    fake_tq.write("old_log_probs", OLD2)
    call(s.after_old_log_prob, batch, step=2)
    log_c = math.inf if truncation is None else math.log(truncation)
    for k in REPLAYED_KEYS:  # max(mu, old - log c); = mu without truncation
        want = [max(m, o - log_c) for o, m in zip(OLD2[k], OLD1[k])]
        assert fake_tq.get(k, "old_log_probs").tolist() == pytest.approx(want, abs=1e-6), k
    if truncation:  # e.g. ua_1_0: old [-0.5, 0.5, -1.0], mu [-0.5, -0.5, -3.0] -> [-0.5, 0.5 - ln 2, -1 - ln 2]
        assert fake_tq.get("ua_1_0", "old_log_probs").tolist() == pytest.approx(
            [-0.5, 0.5 - math.log(2), -1.0 - math.log(2)], abs=1e-6)
    for k in STEP2:  # fresh rows keep pi_old
        assert fake_tq.get(k, "old_log_probs").tolist() == pytest.approx(OLD2[k]), k


def test_after_old_log_prob_equal_lengths_dense_batch(fake_tq, monkeypatch):
    """Replayed responses of one length come back from TransferQueue as a dense [B, T] tensor."""
    s = make_stage(enable=True, correction="plain")
    rows = {**rollout_rows("ua", [1], [1.0, 0.0], [2, 2]), **rollout_rows("ub", [2], [0.0, 1.0], [2, 2])}
    assert plan(s, 2) == 2
    batch, _, _ = run_sample(s, fake_tq, monkeypatch, 1, rows, 2, n_fresh=2)
    fake_tq.write("old_log_probs", {k: [-1.0, -2.0] for k in rows})
    fake_tq.write("advantages", {k: [1.0, 1.0] for k in rows})
    s.store_fresh(batch, 1)
    assert plan(s, 2, step=2) == 1
    fresh = rollout_rows("uc", [3], [1.0, 0.0], [2, 2])
    batch, metrics, _ = run_sample(s, fake_tq, monkeypatch, 2, fresh, 2, n_fresh=1)
    keys = [k for k in batch.keys if s.is_replayed(k)]  # one group of two responses (B=2, delta=0.5)
    assert len(keys) == 2 and keys[0].split("_")[0] in ("ua", "ub") and metrics["replay/replayed_groups"] == 1.0
    fake_tq.write("old_log_probs", {k: [0.0, -3.0] for k in batch.keys})
    w = call(s.after_old_log_prob, batch, step=2)["replay/is_weight_mean"]
    assert w == pytest.approx((math.exp(1.0) + math.exp(-1.0)) / 2, rel=1e-6)
    for k in keys:
        assert fake_tq.get(k, "old_log_probs").tolist() == [-1.0, -2.0]


@pytest.mark.parametrize("reuse", [True, False])
def test_after_advantage_restores_stored_advantages(fake_tq, monkeypatch, reuse):
    s = make_stage(enable=True, reuse_advantages=reuse)
    run_step1(s, fake_tq, monkeypatch)
    batch, _ = run_step2_sample(s, fake_tq, monkeypatch)
    fake_tq.write("old_log_probs", OLD2)
    call(s.after_old_log_prob, batch, step=2)
    recomputed = {k: [-7.0] * len(v) for k, v in OLD2.items()}
    fake_tq.write("advantages", recomputed)
    call(s.after_advantage, batch, step=2)
    for k in REPLAYED_KEYS:
        want = ADV1[k] if reuse else recomputed[k]
        assert fake_tq.get(k, "advantages").tolist() == want, k
    for k in STEP2:
        assert fake_tq.get(k, "advantages").tolist() == recomputed[k], k


def test_step2_store_fresh_keeps_replayed_groups_and_dedups(fake_tq, monkeypatch):
    s = make_stage(enable=True)
    run_step1(s, fake_tq, monkeypatch)
    same_prompt = {**rollout_rows("ue", [1, 2, 3], [0.0, 1.0], [1, 1]), **rollout_rows("uf", [10], [1.0, 1.0], [1, 1])}
    batch, _ = run_step2_sample(s, fake_tq, monkeypatch, fresh=same_prompt)
    fake_tq.write("old_log_probs", {k: [-0.5] * len(fake_tq.data[P][k]["responses"]) for k in batch.keys})
    call(s.after_old_log_prob, batch, step=2)
    fake_tq.write("advantages", {k: [0.0] * len(fake_tq.data[P][k]["responses"]) for k in batch.keys})
    call(s.after_advantage, batch, step=2)
    out = call(s.after_update_actor, batch, step=2)
    # ue (mixed) replaces ua (same prompt), uf (all correct) is skipped, replayed ub is not re-added
    assert out == {"replay/stored": 1, "replay/evicted": 0, "replay/size": 2}
    assert [(g.uid, g.step) for g in s.buffer.groups] == [("ub", 1), ("ue", 2)]
    assert torch.equal(s.buffer.groups[0].payload["behaviour_log_probs"][1], torch.tensor(OLD1["ub_1_0"]))  # mu kept


def test_stage_state_round_trip_and_fingerprint(fake_tq, monkeypatch):
    s = make_stage(enable=True, store_only_mixed=False)
    run_step1(s, fake_tq, monkeypatch)
    for _ in range(3):  # advance the sampling generator: the state must carry it
        s.buffer.sample(2)
    blob = io.BytesIO()
    torch.save(s.state_dict(), blob)
    blob.seek(0)
    t = make_stage(enable=True, store_only_mixed=False)
    assert t.fingerprint() != s.fingerprint()
    t.load_state_dict(torch.load(blob, weights_only=False))
    assert t.fingerprint() == s.fingerprint() == state_fingerprint(s.state_dict())
    t.load_state_dict({})  # replay was off in the checkpoint: ignored
    assert t.fingerprint() == s.fingerprint()
    # the restored stage draws the same replayed groups as the original (4 stored, 2 drawn)
    b1, _ = run_step2_sample(s, fake_tq, monkeypatch)
    b2, _ = run_step2_sample(t, fake_tq, monkeypatch)
    assert len(b1.keys) == 8 and b1.keys == b2.keys
