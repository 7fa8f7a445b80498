"""benchmarks.learning_setup: named tasks and the start-of-training group profile."""

import pytest

from benchmarks import learning_setup as ls


def test_summarise_groups_hand_counts():
    # 6 prompts, n = 4: two all-correct, two all-wrong, two mixed.
    rates = [1.0, 1.0, 0.0, 0.0, 0.25, 0.75]
    classes = ["+ 1x1", "+ 1x1", "* 3x3", "* 3x3", "+ 4x4", "+ 1x1"]
    out = ls.summarise_groups(rates, classes)
    assert out["prompts"] == 6
    assert out["mean_acc"] == pytest.approx(3.0 / 6)
    assert out["all_correct"] == pytest.approx(2 / 6)
    assert out["all_wrong"] == pytest.approx(2 / 6)
    assert out["effective_ratio"] == pytest.approx(2 / 6)
    assert out["by_class"]["+ 1x1"] == {
        "prompts": 3, "mean_acc": pytest.approx(2.75 / 3), "all_correct": pytest.approx(2 / 3),
        "all_wrong": 0.0, "effective_ratio": pytest.approx(1 / 3),
    }
    assert out["by_class"]["* 3x3"]["all_wrong"] == 1.0
    assert list(out["by_class"]) == sorted(out["by_class"])


@pytest.mark.parametrize(
    "rates, classes, match",
    [([], None, "no pass rates"), ([0.5], ["a", "b"], "2 classes for 1"), ([1.5], None, r"\[0, 1\]")],
)
def test_summarise_groups_rejects_bad_input(rates, classes, match):
    with pytest.raises(ValueError, match=match):
        ls.summarise_groups(rates, classes)


def test_spread_task_is_the_papers_regime_shape():
    spread, add2 = ls.TASKS["spread"], ls.TASKS["add2"]
    assert (spread.min_digits, spread.max_digits, spread.ops) == (1, 4, ("+", "*"))
    # The 4-digit worked additions need ~45 tokens; add2's 24 would cut them off.
    assert spread.max_new_tokens == 48 and add2.max_new_tokens == 24
    assert spread.key() != add2.key() and add2 == ls.LearningSetupConfig()


def test_cli_task_defaults_and_explicit_flags(monkeypatch):
    seen = {}

    def fake_build(cfg, out, force=False):
        seen["cfg"] = cfg
        raise SystemExit(0)

    monkeypatch.setattr(ls, "build_setup", fake_build)
    with pytest.raises(SystemExit):
        ls.main(["--task", "spread", "--seed", "3"])
    assert seen["cfg"] == ls.LearningSetupConfig(min_digits=1, max_digits=4, ops=("+", "*"), max_new_tokens=48, seed=3)
    with pytest.raises(SystemExit):
        ls.main(["--task", "spread", "--max-new-tokens", "64", "--ops", "+"])
    assert (seen["cfg"].max_new_tokens, seen["cfg"].ops, seen["cfg"].max_digits) == (64, ("+",), 4)
