"""CPU learning benchmark: every recipe trained side by side on a task a tiny model learns
in minutes, with equal rollout budgets, over one or more seeds; checks the papers' findings.

    python benchmarks/learning.py                                   # full: 3 seeds x 6 recipes, ~30 min on 2 cores
    python benchmarks/learning.py --quick                           # smoke check: seed 0, 8 steps, ~8 min
    python benchmarks/learning.py --recipes grpo iterative_dpo lorr_dpo --seeds 0  # the DPO recipes too
    python benchmarks/learning.py --recipes grpo raft raft_pp --dry-run  # runs and cost estimate only
    python benchmarks/learning.py --recipes grpo raft --seeds 0 --steps 3 --test-freq 3 --out /tmp/lb_smoke

**Task and model** (``benchmarks/learning_setup.py``, cached): 2-digit addition with a
worked column-by-column solution, a 156 k-parameter Qwen2 warm-started by a short SFT to
~25 % accuracy sampled at T = 1 (~65 % greedy), 1,000 training and 200 test prompts.

**Runs**: each recipe (``conf/recipe/<name>.yaml``, its own loss, advantages, rewards,
KL and entropy terms) through ``python -m recipe.main`` (:mod:`benchmarks.runs`), with
the measured RL settings of :data:`benchmarks.learning_setup.RECOMMENDED_RL_OVERRIDES`
(lr 1e-4) and an **equal rollout budget**: every step generates
``--rollouts-per-step`` responses (default 64) for every recipe, i.e. ``64 / n`` prompts
x the recipe's ``n`` (16 x 4; PPO, n = 1 as in the Minimalist paper: 64 x 1), for the
same number of steps; ``--updates-per-step`` optimiser steps per training step (default 2:
the Minimalist paper's 1024 prompts in mini-batches of 512; with one, the ratio is exactly 1
at the only update and RAFT++ is RAFT, bit for bit, which a first 3-seed run showed). Only
the learning-rate scale differs from the papers (tiny model: 1e-4, not 1e-6); PPO's critic keeps the paper's critic/actor ratio of 10 (lr 1e-3). Default
recipes: raft, raft_pp, reinforce, reinforce_rej, grpo, ppo (the Minimalist paper's
Table 1). iterative_dpo and lorr_dpo run on request (``--recipes``), one DPO update per
step; ``benchmarks/lorr.py`` compares them in LoRR's regime, and ``grpo_dots_rr`` is
``benchmarks/data_efficiency.py``'s.

**Validation**: the 200 test prompts, each sampled ``--val-samples`` times (default 2) at
T = 1 (``val_kwargs.do_sample=true, temperature=1.0``): accuracy = avg@k, as
``data_efficiency.py``'s ``val_kwargs.n=k``. It is run as ``val_kwargs.n=1`` on a file
holding each test prompt k times (written under ``--out``): the same estimate, but verl
skips its best@k / maj@k bootstrap (``process_validation_metrics``: 1,000 Python-loop
resamples per prompt and metric; alone it takes 39 s for 200 prompts x 4 and 16 s for
x 2, 0.1 s for 800 x 1). Measured: one ``n=4`` validation of 200 prompts took 53-56 s,
the 800-row copy with ``n=1`` 20-25 s.

**Outputs** (``--out``, default ``artifacts/bench/learning``): ``results.md`` and
``results.json`` (per recipe: mean over seeds; per run in the json), PNG plots of the
seed-averaged curves (:func:`recipe.report.plot`: ``val_acc.png``, ``reward.png``,
``entropy.png``, ``kl.png``, ``filter.png``, ... each against step and wall time),
``runs/<recipe>_s<seed>/`` (``metrics.jsonl``, ``command.json``) and ``logs/``. A stopped
benchmark resumes: a finished run of the same command is reused (``--report-only`` redoes
table and plots from the runs there, training nothing). The table: start / final / best
validation accuracy, steps and training wall time (sum of ``timing_s/step``, validation
excluded) to the target accuracy (default the mean start accuracy + 0.08, ``--target`` /
``--target-delta``), final entropy (``actor/entropy``, mean of the last 3 steps) and its
drop from the first 3 steps, seconds per step.

**Findings**: each qualitative claim of the papers (:data:`CLAIMS`) is checked on the
per-seed differences of one summary number (early accuracy: mean of the first 2
validations after step 0; late accuracy: mean of the last 2; entropy drop) and reported
as *holds*, *does not hold* or *inconclusive (difference within seed spread / sampling
noise)*; the spread is the larger of the standard deviation of the per-seed differences
and twice the standard error of one difference from measurement noise (validation
sampling; the step-to-step noise of the entropy), see :func:`evaluate_claim`.

**Settings and cost** (2 cores, measured; :data:`COST_STARTUP_S` ...): a run costs 93-104 s
in all (12 steps): ~43 s of start-up and shut-down (Ray, workers, rollout server, transfer
queue: before any step), 2.1-2.4 s per training step of 2 optimiser steps on an idle
machine (PPO ~0.7 s more: values and critic update), and 6.4-6.8 s per validation of 200
prompts x 2 samples. The full setting (:data:`FULL`) is 3 paired seeds (each seed: the same warm start, data order
and sampling seeds for every recipe) x the 6 base recipes x 12 steps (768 rollouts per
recipe), validation at steps 0, 4, 8, 12 on 200 prompts x 2 samples: ~30 min
(:func:`estimate_run_seconds`; ``--dry-run`` prints it). ``--quick`` (:data:`QUICK`):
seed 0, 8 steps, ~8 min, a smoke check whose findings rest on the validation's
sampling error alone. Two runs at a time (``--jobs 2``) do not help on 2 cores: each of
a pair took 356-376 s against ~170 s alone (4 steps), longer than the two in a row.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.runs import RunFailed, first_reach, preset, read_curve, run_name, run_recipe, series  # noqa: E402

CONF_RECIPES = REPO / "conf" / "recipe"
#: Run by default (the Minimalist paper's Table 1 algorithms).
BASE_RECIPES: tuple[str, ...] = ("raft", "raft_pp", "reinforce", "reinforce_rej", "grpo", "ppo")
#: Run on request (``--recipes``): here one step is one DPO update on that step's pairs;
#: ``benchmarks/lorr.py`` compares them in LoRR's regime (real iterations, L epochs).
OPTIONAL_RECIPES: tuple[str, ...] = ("iterative_dpo", "lorr_dpo")

#: Extra overrides per recipe. PPO: the Minimalist paper's critic lr is 10x the actor's
#: (1e-5 vs 1e-6); the actor here learns at 1e-4, so the critic at 1e-3. (Preference
#: recipes size their own log-prob micro-batches to whole pairs: recipe/trainer.py.)
RECIPE_OVERRIDES: dict[str, tuple[str, ...]] = {
    "ppo": ("critic.optim.lr=1e-3",),
}

#: Validation sampled at T = 1, one sample per row of the repeated test file.
VAL_OVERRIDES: tuple[str, ...] = (
    "actor_rollout_ref.rollout.val_kwargs.do_sample=true",
    "actor_rollout_ref.rollout.val_kwargs.temperature=1.0",
    "actor_rollout_ref.rollout.val_kwargs.n=1",
)

DEFAULT_ROLLOUTS_PER_STEP = 64
#: Optimiser steps per training step: the Minimalist paper's 1024 prompts / mini-batch 512.
DEFAULT_UPDATES_PER_STEP = 2
DEFAULT_JOBS = 1
DEFAULT_VAL_SAMPLES = 2
#: Full and quick settings (``--quick``); ``--seeds`` / ``--steps`` / ``--test-freq`` win.
#: Full: 3 paired seeds x the 6 base recipes x 12 steps (~30 min on 2 cores); quick: a
#: smoke check, seed 0, 8 steps (~8 min).
FULL = {"seeds": [0, 1, 2], "steps": 12, "test_freq": 4}
QUICK = {"seeds": [0], "steps": 8, "test_freq": 4}
DEFAULT_TARGET_DELTA = 0.08
#: Validations after step 0 averaged into "early" / before the end into "late" accuracy.
EARLY_VALS = 2
LATE_VALS = 2
#: Training steps averaged at each end for entropy and training accuracy.
TAIL_STEPS = 3

#: Cost model of one run on this machine (2 cores, seconds), fitted to the full setting's
#: runs (2026-12-06, 93-104 s each): start-up to the first validation plus shut-down (~43
#: s); one training step of 2 optimiser steps (2.1-2.4 s; PPO's values and critic update
#: add ~0.7 s); one validation: a fixed part plus a part per generated sample (400
#: samples: 6.4-6.8 s). The previous fit, from an earlier session's runs (70 s, 5 s a step,
#: 16 s a validation), said ~60 min for this setting; these runs took half that.
COST_STARTUP_S = 43.0
COST_STEP_S = 2.25
COST_CRITIC_EXTRA_S = 0.7
COST_VAL_S = 2.7
COST_VAL_S_PER_SAMPLE = 0.01


# --------------------------------------------------------------------------- recipes


def recipe_settings(name: str, conf_dir: str | Path = CONF_RECIPES) -> dict:
    """Responses per prompt and critic use of ``conf/recipe/<name>.yaml``.

    A recipe that starts from others (``defaults: [iterative_dpo]``) inherits their
    values; its own keys win.

    Returns:
        ``{"n": actor_rollout_ref.rollout.n (4 when no recipe in the chain sets it),
        "critic": critic.enable (False when unset)}``.

    Raises:
        FileNotFoundError: No such recipe (names the file and the recipes there).
    """
    import yaml

    def load(recipe: str, seen: tuple[str, ...]) -> dict:
        path = Path(conf_dir) / f"{recipe}.yaml"
        if not path.is_file():
            have = sorted(p.stem for p in Path(conf_dir).glob("*.yaml"))
            raise FileNotFoundError(f"recipe {recipe!r}: {path} does not exist (recipes: {', '.join(have)})")
        cfg = yaml.safe_load(path.read_text()) or {}
        out: dict = {}
        for base in cfg.get("defaults") or []:
            if isinstance(base, str) and base != "_self_" and base not in seen:
                out.update(load(base, (*seen, base)))
        n = ((cfg.get("actor_rollout_ref") or {}).get("rollout") or {}).get("n")
        if n is not None:
            out["n"] = int(n)
        enable = (cfg.get("critic") or {}).get("enable")
        if enable is not None:
            out["critic"] = bool(enable)
        return out

    return {"n": 4, "critic": False, **load(name, (name,))}


def budget_overrides(n: int, rollouts_per_step: int, critic: bool = False,
                     updates_per_step: int = DEFAULT_UPDATES_PER_STEP) -> list[str]:
    """Batch overrides giving ``rollouts_per_step`` responses per step as prompts x ``n``,
    trained in ``updates_per_step`` optimiser steps (mini-batches of prompts /
    ``updates_per_step`` prompts; Minimalist paper: 1024 prompts in mini-batches of 512, so 2).
    With 1 update per step the ratio pi_theta / pi_old is exactly 1 at the only update, so
    RAFT++ is RAFT and the clipped Reinforce losses are plain policy gradients. Micro-batches
    (actor, log-probs, critic) hold a whole mini-batch (the tiny model fits; the recipe's config
    check wants them to divide it).

    Args:
        n: Responses per prompt (``actor_rollout_ref.rollout.n``).
        rollouts_per_step: Responses generated per training step, B = prompts x n.
        critic: Also size the critic's batches (PPO).
        updates_per_step: Optimiser steps per training step (actor and critic).

    Raises:
        ValueError: ``n`` < 1, ``rollouts_per_step`` not a positive multiple of ``n``, or the
            prompts of a step not a positive multiple of ``updates_per_step``.
    """
    if n < 1 or rollouts_per_step < n or rollouts_per_step % n:
        raise ValueError(f"rollouts_per_step={rollouts_per_step} is not a positive multiple of "
                         f"actor_rollout_ref.rollout.n={n}")
    prompts = rollouts_per_step // n
    if updates_per_step < 1 or prompts % updates_per_step:
        raise ValueError(f"updates_per_step={updates_per_step} does not divide the {prompts} prompts of a step "
                         f"(rollouts_per_step={rollouts_per_step} / n={n})")
    mini = prompts // updates_per_step
    out = [
        f"data.train_batch_size={prompts}",
        f"actor_rollout_ref.rollout.n={n}",
        f"actor_rollout_ref.actor.ppo_mini_batch_size={mini}",
        f"actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu={mini * n}",
        f"actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu={mini * n}",
        f"actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu={mini * n}",
    ]
    if critic:
        out += [f"critic.ppo_mini_batch_size={mini}", f"critic.ppo_micro_batch_size_per_gpu={mini * n}"]
    return out


def write_val_copies(test: str | Path, copies: int, out: str | Path) -> Path:
    """Write the test parquet with every row repeated ``copies`` times (row order: all
    rows, then all rows again, ...); returns the new file's path.

    Raises:
        ValueError: ``copies`` < 1.
        FileNotFoundError: ``test`` is missing.
    """
    import pandas as pd

    if copies < 1:
        raise ValueError(f"--val-samples={copies}: need at least 1 sample per test prompt")
    test = Path(test)
    if not test.is_file():
        raise FileNotFoundError(f"test split {test} not found (benchmarks/learning_setup.py builds it)")
    df = pd.read_parquet(test)
    path = Path(out) / f"{test.stem}_x{copies}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat([df] * copies, ignore_index=True).to_parquet(path)
    return path


def estimate_run_seconds(steps: int, test_freq: int, critic: bool = False, val_samples: int = 400) -> float:
    """Cost model of one run in seconds (:data:`COST_STARTUP_S` ...): start-up, ``steps`` training
    steps, validations of ``val_samples`` generations each at step 0, every ``test_freq`` steps and
    at the last step."""
    vals = 1 + steps // test_freq + (1 if steps % test_freq else 0)
    step_s = COST_STEP_S + (COST_CRITIC_EXTRA_S if critic else 0.0)
    return COST_STARTUP_S + steps * step_s + vals * (COST_VAL_S + val_samples * COST_VAL_S_PER_SAMPLE)


# --------------------------------------------------------------------------- summary


def _mean(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return sum(xs) / len(xs) if xs else math.nan


def _sd(xs: Sequence[float]) -> float:
    xs = [x for x in xs if x is not None and not (isinstance(x, float) and math.isnan(x))]
    return statistics.stdev(xs) if len(xs) >= 2 else math.nan


def run_stats(curve: dict, target: float, early: int = EARLY_VALS, late: int = LATE_VALS,
              tail: int = TAIL_STEPS) -> dict:
    """Summary numbers of one run.

    Args:
        curve: From :func:`benchmarks.runs.read_curve`.
        target: Target validation accuracy.
        early: Validations after step 0 averaged into ``early_acc``.
        late: Last validations (after step 0) averaged into ``late_acc``.
        tail: Training steps averaged at each end for entropy and training accuracy.

    Returns:
        ``steps`` (last step), ``start_acc`` (step-0 validation), ``final_acc`` (last
        validation), ``best_acc`` (highest validation, step 0 included), ``early_acc``,
        ``late_acc``, ``steps_to_target`` / ``wall_to_target`` (s; None if not reached),
        ``entropy_start`` / ``entropy_final`` (nats/token, mean ``actor/entropy`` of the
        first / last ``tail`` steps), ``entropy_drop_pct`` (100 (1 - final / start)) and
        ``entropy_drop_pct_se`` (its standard error from the step-to-step noise),
        ``train_acc_final`` (mean ``reward/acc`` of the last ``tail`` steps),
        ``reward_final`` (same for ``critic/score/mean``: recipe-specific scale),
        ``s_per_step`` (mean ``timing_s/step``), ``wall_s`` (training wall time). NaN
        where the run did not log the metric.

    Raises:
        ValueError: The run has no validation after step 0 (names its file).
    """
    val = curve["val"]
    after = [s for s in sorted(val) if s > 0]
    if not after:
        raise ValueError(f"{curve.get('file', 'run')}: no validation after step 0 (validation key {curve['val_key']})")
    ent = list(series(curve, "actor/entropy").values())
    acc = list(series(curve, "reward/acc").values())
    score = list(series(curve, "critic/score/mean").values())
    times = list(series(curve, "timing_s/step").values())
    step, wall = first_reach(curve, target)
    e0, e1 = _mean(ent[:tail]), _mean(ent[-tail:])
    # step-to-step noise of the entropy (sd of successive differences / sqrt 2: a trend barely
    # enters it), its standard error over a tail window, and the error of 100 (1 - e1 / e0)
    noise = _sd([b - a for a, b in zip(ent, ent[1:])]) / math.sqrt(2) if len(ent) >= 3 else math.nan
    se = noise / math.sqrt(min(tail, len(ent))) if ent else math.nan
    drop_se = 100.0 * se * math.sqrt(1.0 + (e1 / e0) ** 2) / e0 if e0 and not math.isnan(e0) else math.nan
    last = max(curve["steps"])
    return {
        "steps": last,
        "start_acc": val.get(0, math.nan),
        "final_acc": val[after[-1]],
        "best_acc": max(val.values()),
        "early_acc": _mean([val[s] for s in after[:early]]),
        "late_acc": _mean([val[s] for s in after[-late:]]),
        "steps_to_target": step,
        "wall_to_target": wall,
        "entropy_start": e0,
        "entropy_final": e1,
        "entropy_drop_pct": 100.0 * (1.0 - e1 / e0) if e0 and not math.isnan(e0) else math.nan,
        "entropy_drop_pct_se": drop_se,
        "train_acc_final": _mean(acc[-tail:]),
        "reward_final": _mean(score[-tail:]),
        "s_per_step": _mean(times),
        "wall_s": curve["wall"][last],
    }


NUMERIC = ("start_acc", "final_acc", "best_acc", "early_acc", "late_acc", "entropy_start", "entropy_final",
           "entropy_drop_pct", "train_acc_final", "reward_final", "s_per_step", "wall_s")


def aggregate(stats: Sequence[dict]) -> dict:
    """Mean (and ``<key>_sd``, sample standard deviation, NaN for one seed) over seeds.

    Steps and wall time to target are averaged over the seeds that reached it;
    ``reached`` counts them (``runs`` = number of seeds).

    Raises:
        ValueError: ``stats`` is empty.
    """
    if not stats:
        raise ValueError("aggregate() needs at least one run")
    out: dict = {"runs": len(stats)}
    for k in NUMERIC:
        vals = [s[k] for s in stats]
        out[k], out[f"{k}_sd"] = _mean(vals), _sd(vals)
    hit = [s for s in stats if s["steps_to_target"] is not None]
    out["reached"] = len(hit)
    out["steps_to_target"] = _mean([s["steps_to_target"] for s in hit]) if hit else None
    out["wall_to_target"] = _mean([s["wall_to_target"] for s in hit]) if hit else None
    return out


def _f(x, fmt: str = "{:.3f}", missing: str = "-") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    return fmt.format(x)


def _pm(mean: float, sd: float, fmt: str = "{:.3f}") -> str:
    s = _f(mean, fmt)
    return s if sd is None or math.isnan(sd) else f"{s} ± {_f(sd, fmt)}"


def results_table(aggs: Mapping[str, dict], target: float, failed: Mapping[str, str] | None = None) -> str:
    """Markdown table, one row per recipe (means over seeds ± sample sd).

    Args:
        aggs: recipe -> :func:`aggregate` result, in display order.
        target: The target accuracy (column header).
        failed: recipe -> reason, for recipes with no finished run (one row each).
    """
    lines = [
        f"| recipe | seeds | start acc | final acc | best acc | steps to {target:.3f} | wall (s) to {target:.3f} "
        "| final entropy | entropy drop | final train acc | s/step |",
        "|:---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for name, a in aggs.items():
        reach = f"{_f(a['steps_to_target'], '{:.1f}', 'not reached')} ({a['reached']}/{a['runs']})"
        wall = f"{_f(a['wall_to_target'], '{:.0f}', 'not reached')}"
        lines.append(
            f"| {name} | {a['runs']} | {_f(a['start_acc'])} | {_pm(a['final_acc'], a['final_acc_sd'])} "
            f"| {_f(a['best_acc'])} | {reach} | {wall} | {_pm(a['entropy_final'], a['entropy_final_sd'])} "
            f"| {_f(a['entropy_drop_pct'], '{:.0f} %')} | {_f(a['train_acc_final'])} "
            f"| {_f(a['s_per_step'], '{:.2f}')} |"
        )
    for name, why in (failed or {}).items():
        lines.append(f"| {name} | 0 | failed: {why} |  |  |  |  |  |  |  |  |")
    return "\n".join(lines)


# --------------------------------------------------------------------------- findings


@dataclass(frozen=True)
class Claim:
    """A qualitative finding: recipe ``a`` vs recipe ``b`` on one summary number.

    Attributes:
        text: The claim, in words.
        source: Where it comes from (paper, table).
        metric: A :func:`run_stats` key (``early_acc``, ``late_acc``, ``entropy_drop_pct``).
        a / b: Recipe names.
        relation: ``greater`` (a's number above b's) or ``similar`` (equal within the spread).
    """

    text: str
    source: str
    metric: str
    a: str
    b: str
    relation: str = "greater"


#: The claims checked, Minimalist paper (arXiv 2504.11343, PAPERS.md §1; Table 1 numbers
#: are avg on Qwen2.5-Math-7B) and LoRR (arXiv 2508.06412, PAPERS.md §3).
CLAIMS: tuple[Claim, ...] = (
    Claim("RAFT++ learns faster early than RAFT", "Minimalist §1 findings", "early_acc", "raft_pp", "raft"),
    Claim("RAFT++ ends above RAFT", "Minimalist Table 1: 56.1 vs 52.3", "late_acc", "raft_pp", "raft"),
    Claim("RAFT++ is ahead of GRPO early (GRPO overtakes it only later, ~iteration 100)",
          "Minimalist §1 findings", "early_acc", "raft_pp", "grpo"),
    Claim("RAFT++'s entropy collapses faster than GRPO's (it learns from correct samples only)",
          "Minimalist §1 findings", "entropy_drop_pct", "raft_pp", "grpo"),
    Claim("RAFT's entropy collapses faster than GRPO's (correct samples only)",
          "Minimalist (positive-only training)", "entropy_drop_pct", "raft", "grpo"),
    Claim("RAFT's entropy collapses faster than RAFT++'s (no clipped ratio bounding each update)",
          "expected from the losses", "entropy_drop_pct", "raft", "raft_pp"),
    Claim("Reinforce-Rej (drops all-wrong and all-correct groups) beats Reinforce",
          "Minimalist Table 1: 56.4 vs 53.9", "late_acc", "reinforce_rej", "reinforce"),
    Claim("GRPO >= Reinforce", "Minimalist Table 1: 56.3 vs 53.9", "late_acc", "grpo", "reinforce"),
    Claim("Reinforce-Rej matches GRPO", "Minimalist Table 1: 56.4 vs 56.3", "late_acc", "reinforce_rej", "grpo",
          "similar"),
    Claim("GRPO beats PPO", "Minimalist Table 1: 56.3 vs 52.5", "late_acc", "grpo", "ppo"),
    Claim("GRPO beats iterative DPO", "Minimalist Table 1: 56.3 vs 48.8", "late_acc", "grpo", "iterative_dpo"),
    Claim("LoRR improves iterative DPO", "LoRR (arXiv 2508.06412)", "late_acc", "lorr_dpo", "iterative_dpo"),
    Claim("Iterative DPO + LoRR is comparable to RL (GRPO)", "LoRR (arXiv 2508.06412)", "late_acc", "lorr_dpo",
          "grpo", "similar"),
)

ACC_METRICS = {"early_acc": EARLY_VALS, "late_acc": LATE_VALS}
#: A difference counts when it exceeds this many standard errors of measurement noise
#: (2: chance alone gives one that large in ~5 % of comparisons).
NOISE_Z = 2.0


def sampling_se(p_a: float, p_b: float, n_samples: int, n_vals: int = 1) -> float:
    """Standard error of the difference of two validation accuracies from sampling alone.

    Each accuracy is a mean of ``n_samples`` Bernoulli outcomes per validation, averaged
    over ``n_vals`` validations: SE = sqrt((p_a (1 - p_a) + p_b (1 - p_b)) / (n_samples n_vals)).
    (Prompts are shared by both runs, so this over-states the paired noise a little.)
    """
    if n_samples <= 0:
        return 0.0
    var = p_a * (1 - p_a) + p_b * (1 - p_b)
    return math.sqrt(max(var, 0.0) / (n_samples * max(n_vals, 1)))


def evaluate_claim(claim: Claim, stats: Mapping[tuple[str, int], dict], seeds: Sequence[int],
                   n_val_samples: int = 0) -> dict:
    """Check one claim on the per-seed numbers of its two recipes.

    d_s = m_a(s) - m_b(s) for every seed s both recipes finished; mean d; spread =
    max(sample sd of the d_s (2+ seeds), :data:`NOISE_Z` x the standard error of one
    run's d): :func:`sampling_se` for accuracy metrics, sqrt(se_a^2 + se_b^2) from the
    runs' ``<metric>_se`` (entropy drop, :func:`run_stats`) otherwise. ``greater``: *holds* if mean d > spread, *does
    not hold* if mean d < -spread, else *inconclusive (difference within seed spread)*
    (or *sampling noise*, whichever set the spread). ``similar``: *holds (difference
    within ...)* if |mean d| <= spread, else *does not hold*. With one seed and no noise estimate: the sign
    decides, marked *(one seed)*.

    Args:
        claim: The claim.
        stats: (recipe, seed) -> :func:`run_stats` result.
        seeds: Seeds to use.
        n_val_samples: Validation samples per validation (prompts x samples), for the
            sampling error of accuracy metrics (0: none).

    Returns:
        ``{"claim", "source", "metric", "a", "b", "relation", "verdict", "a_mean",
        "b_mean", "diff", "spread", "diffs" (per seed), "seeds", "numbers" (text)}``;
        verdict ``not run`` when a recipe has no finished run.
    """
    out = {"claim": claim.text, "source": claim.source, "metric": claim.metric, "a": claim.a, "b": claim.b,
           "relation": claim.relation}
    both = [s for s in seeds if (claim.a, s) in stats and (claim.b, s) in stats
            and not math.isnan(stats[(claim.a, s)][claim.metric]) and not math.isnan(stats[(claim.b, s)][claim.metric])]
    if not both:
        missing = [r for r in (claim.a, claim.b) if not any((r, s) in stats for s in seeds)]
        return {**out, "verdict": "not run", "numbers": f"no finished runs of {', '.join(missing) or 'both'}",
                "diffs": [], "seeds": []}
    va = [stats[(claim.a, s)][claim.metric] for s in both]
    vb = [stats[(claim.b, s)][claim.metric] for s in both]
    diffs = [x - y for x, y in zip(va, vb)]
    d, a_mean, b_mean = _mean(diffs), _mean(va), _mean(vb)
    sd = _sd(diffs)
    floor = 0.0
    if claim.metric in ACC_METRICS:
        floor = NOISE_Z * sampling_se(a_mean, b_mean, n_val_samples, ACC_METRICS[claim.metric])
    elif all(f"{claim.metric}_se" in stats[(r, s)] for r in (claim.a, claim.b) for s in both):
        se2 = [_mean([stats[(r, s)][f"{claim.metric}_se"] ** 2 for s in both]) for r in (claim.a, claim.b)]
        floor = NOISE_Z * math.sqrt(sum(se2)) if not any(math.isnan(x) for x in se2) else 0.0
    spread = max(0.0 if math.isnan(sd) else sd, floor)
    one_seed = len(both) == 1 and spread == 0.0
    noise = "seed spread" if not math.isnan(sd) and sd >= floor else "sampling noise"
    if claim.relation == "similar":
        verdict = f"holds (difference within {noise})" if abs(d) <= spread else "does not hold"
    elif d > spread:
        verdict = "holds"
    elif d < -spread:
        verdict = "does not hold"
    else:
        verdict = f"inconclusive (difference within {noise})"
    if one_seed:
        verdict += " (one seed)"
    fmt = "{:.1f}" if claim.metric == "entropy_drop_pct" else "{:.3f}"
    unit = " %" if claim.metric == "entropy_drop_pct" else ""
    numbers = (f"{claim.metric}: {claim.a} {fmt.format(a_mean)}{unit} vs {claim.b} {fmt.format(b_mean)}{unit}, "
               f"diff {fmt.format(d)}{unit} (per seed {', '.join(fmt.format(x) for x in diffs)}; "
               f"spread {fmt.format(spread)}{unit})")
    return {**out, "verdict": verdict, "a_mean": a_mean, "b_mean": b_mean, "diff": d, "spread": spread,
            "diffs": diffs, "seeds": list(both), "numbers": numbers}


def findings_markdown(findings: Sequence[dict]) -> str:
    """One bullet per claim: claim (source): numbers -> **verdict**."""
    lines = []
    for f in findings:
        lines.append(f"- {f['claim']} ({f['source']}): {f['numbers']} -> **{f['verdict']}**")
    return "\n".join(lines)


# --------------------------------------------------------------------------- plots


def plot_curves(run_dirs: Mapping[str, Sequence[Path]], out: Path) -> list[Path]:
    """Seed-averaged curves, one line per recipe, with :func:`recipe.report.plot`.

    Args:
        run_dirs: recipe -> its runs' directories (each holding ``metrics.jsonl``).
        out: Folder of the PNG files.

    Returns:
        The PNG paths written.
    """
    from recipe import report

    runs = {}
    for recipe, dirs in run_dirs.items():
        frames = [report.load_metrics(d) for d in dirs]
        if frames:
            runs[recipe] = mean_frame(frames)
    return report.plot(runs, out) if runs else []


def mean_frame(frames: Sequence):
    """Step-wise mean of :func:`recipe.report.load_metrics` frames (NaN skipped), the
    ``wall_time_s`` column included."""
    import pandas as pd

    return pd.concat(list(frames)).groupby(level=0).mean()


# --------------------------------------------------------------------------- main


def json_safe(x):
    """``x`` with NaN / inf floats replaced by ``None`` (strict JSON), recursively."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, Mapping):
        return {str(k): json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def _hms(seconds: float) -> str:
    seconds = max(0, int(round(seconds)))
    return f"{seconds // 60}m{seconds % 60:02d}s"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help=f"smoke setting {QUICK} (~8 min)")
    p.add_argument("--recipes", nargs="+", default=list(BASE_RECIPES),
                   help=f"recipes to train (default: {' '.join(BASE_RECIPES)}; also {' '.join(OPTIONAL_RECIPES)})")
    p.add_argument("--seeds", type=int, nargs="+", default=None, help=f"default {FULL['seeds']}")
    p.add_argument("--steps", type=int, default=None, help=f"training steps of every run (default {FULL['steps']})")
    p.add_argument("--test-freq", type=int, default=None,
                   help=f"validate every this many steps (default {FULL['test_freq']})")
    p.add_argument("--rollouts-per-step", type=int, default=DEFAULT_ROLLOUTS_PER_STEP,
                   help="responses generated per step by every recipe (prompts x n)")
    p.add_argument("--updates-per-step", type=int, default=DEFAULT_UPDATES_PER_STEP,
                   help="optimiser steps per training step (paper: 1024 prompts / mini-batch 512 = 2; "
                        "with 1, RAFT++ is exactly RAFT)")
    p.add_argument("--val-samples", type=int, default=DEFAULT_VAL_SAMPLES,
                   help="samples per test prompt at each validation (T = 1)")
    p.add_argument("--target", type=float, default=None, help="target validation accuracy (absolute)")
    p.add_argument("--target-delta", type=float, default=DEFAULT_TARGET_DELTA,
                   help="target = mean start accuracy + this (when --target is not given)")
    p.add_argument("--out", default=str(REPO / "artifacts" / "bench" / "learning"))
    p.add_argument("--override", nargs="*", default=[], help="extra Hydra overrides for every run")
    p.add_argument("--jobs", type=int, default=DEFAULT_JOBS,
                   help="runs at a time (each ~5 GiB; on 2 cores 2 at a time was slower than 1 at a time)")
    p.add_argument("--dry-run", action="store_true", help="print the runs and the cost estimate, run nothing")
    p.add_argument("--report-only", action="store_true",
                   help="train nothing: table, findings and plots from the runs under --out/runs (give the "
                        "settings they were run with: --val-samples enters the sampling error)")
    return p


def resolve_settings(args: argparse.Namespace) -> argparse.Namespace:
    """Fill ``seeds`` / ``steps`` / ``test_freq`` left unset from :data:`QUICK` (``--quick``) or
    :data:`FULL`; values given on the command line win.

    Raises:
        SystemExit: ``--steps`` / ``--test-freq`` / ``--jobs`` below 1, or no seed.
    """
    vars(args).update(preset(args, FULL, QUICK))
    for key in ("steps", "test_freq", "jobs"):
        if getattr(args, key) < 1:
            raise SystemExit(f"--{key.replace('_', '-')}={getattr(args, key)}: need at least 1")
    if not args.seeds:
        raise SystemExit("--seeds: give at least one seed")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run (or reuse) every recipe x seed, then write the table, findings and plots."""
    args = resolve_settings(_parser().parse_args(argv))
    recipes = list(args.recipes)
    settings = {r: recipe_settings(r) for r in recipes}  # fails early on an unknown recipe
    for r, s in settings.items():
        budget_overrides(s["n"], args.rollouts_per_step, s["critic"], args.updates_per_step)  # fails early
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(seed, r) for seed in args.seeds for r in recipes]
    from benchmarks.learning_setup import LearningSetupConfig

    val_gen = LearningSetupConfig().n_test * args.val_samples  # generations per validation
    est = {r: estimate_run_seconds(args.steps, args.test_freq, settings[r]["critic"], val_gen) for r in recipes}
    total_est = sum(est[r] for _, r in jobs) / args.jobs
    print(f"[learning] {len(recipes)} recipes x {len(args.seeds)} seeds = {len(jobs)} runs of {args.steps} steps "
          f"({args.rollouts_per_step} rollouts/step, validation every {args.test_freq}); estimated "
          f"{_hms(total_est)} for runs not done yet", flush=True)
    if args.dry_run:
        for seed, r in jobs:
            print(f"  {run_name(r, seed)}: n={settings[r]['n']} critic={settings[r]['critic']} ~{est[r]:.0f} s")
        return 0

    import pandas as pd

    from benchmarks.learning_setup import RECOMMENDED_RL_OVERRIDES, build_setup, verl_overrides

    setup = build_setup()
    val_file = write_val_copies(setup.data["test"], args.val_samples, out / "data")
    n_val_prompts = len(pd.read_parquet(setup.data["test"]))
    common = [*verl_overrides(setup), *RECOMMENDED_RL_OVERRIDES, f"data.val_files={val_file}", *VAL_OVERRIDES]

    t0 = time.time()
    done_s: list[tuple[float, float]] = []  # (measured, modelled) seconds of the runs made
    run_dirs: dict[tuple[str, int], Path] = {}
    failed: dict[str, str] = {}
    lock = threading.Lock()

    def one(i: int, seed: int, r: str) -> None:
        with lock:
            # ETA: the cost model of the runs not started, scaled by measured / modelled time of the runs done
            scale = sum(t for t, _ in done_s) / sum(e for _, e in done_s) if done_s else 1.0
            eta = scale * sum(est[x] for _, x in jobs[i:]) / args.jobs
            print(f"[learning] run {i + 1}/{len(jobs)}: {r} seed {seed}; elapsed {_hms(time.time() - t0)}, "
                  f"ETA {_hms(eta)}", flush=True)
        overrides = [*common, *budget_overrides(settings[r]["n"], args.rollouts_per_step, settings[r]["critic"],
                                                args.updates_per_step),
                     *RECIPE_OVERRIDES.get(r, ()), *args.override]
        t_run = time.time()
        try:
            run_dir = run_recipe(r, overrides, out / "runs", args.steps, args.test_freq, seed, out / "logs")
        except RunFailed as e:
            with lock:
                print(f"[learning] {e}", flush=True)
                failed.setdefault(r, f"see logs/{run_name(r, seed)}.log")
            return
        with lock:
            if time.time() - t_run > 5:  # not a reused run
                done_s.append((time.time() - t_run, est[r]))
            run_dirs[(r, seed)] = run_dir

    if args.report_only:
        for seed, r in jobs:
            d = out / "runs" / run_name(r, seed)
            if (d / "metrics.jsonl").is_file():
                run_dirs[(r, seed)] = d
            else:
                failed.setdefault(r, f"no {d / 'metrics.jsonl'}")
    else:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            for fut in [pool.submit(one, i, seed, r) for i, (seed, r) in enumerate(jobs)]:
                fut.result()
    curves = {k: read_curve(run_dirs[k]) for k in [(r, s) for s, r in jobs] if k in run_dirs}
    dirs = {r: [run_dirs[(r, s)] for s in args.seeds if (r, s) in run_dirs] for r in recipes}

    start = [c["val"][0] for c in curves.values() if 0 in c["val"]]
    target = args.target if args.target is not None else _mean(start) + args.target_delta
    stats = {k: run_stats(c, target) for k, c in curves.items()}
    aggs = {r: aggregate([stats[(r, s)] for s in args.seeds if (r, s) in stats])
            for r in recipes if any((r, s) in stats for s in args.seeds)}
    failed = {r: why for r, why in failed.items() if r not in aggs}
    findings = [evaluate_claim(c, stats, args.seeds, n_val_prompts * args.val_samples) for c in CLAIMS
                if c.a in recipes and c.b in recipes]
    pngs = plot_curves({r: d for r, d in dirs.items() if d}, out)
    table = results_table(aggs, target, failed)
    elapsed = time.time() - t0
    shapes = ", ".join(f"{r} {args.rollouts_per_step // settings[r]['n']}x{settings[r]['n']}" for r in recipes)
    text = "\n".join([
        "# CPU learning benchmark", "", table, "",
        f"Means over seeds {args.seeds} (± sample sd); target = {target:.3f} "
        f"({'given' if args.target is not None else f'mean start accuracy + {args.target_delta}'}); "
        f"steps / wall to target: mean over the seeds that reached it (reached/seeds). "
        f"Accuracy: {n_val_prompts} test prompts x {args.val_samples} samples at T = 1. Wall time = training "
        f"(sum of timing_s/step), validation excluded. Entropy: actor/entropy, mean of the last {TAIL_STEPS} steps; "
        f"drop = 1 - last/first {TAIL_STEPS} steps. Train acc: reward/acc of the trained batch (preference "
        f"recipes train on best-vs-worst pairs: 0.5 by construction).", "",
        "## Findings", "", findings_markdown(findings) or "(no claim has both recipes in this run)", "",
        f"Early = mean of the first {EARLY_VALS} validations after step 0; late = mean of the last {LATE_VALS}.", "",
        "## Settings", "",
        f"{args.steps} steps, validation every {args.test_freq}, {args.rollouts_per_step} rollouts per step "
        f"in {args.updates_per_step} optimiser step(s) "
        f"(prompts x n per recipe: {shapes}); common overrides {RECOMMENDED_RL_OVERRIDES[-1]}, "
        f"validation {VAL_OVERRIDES[:2]}; per recipe {dict(RECIPE_OVERRIDES)}; extra {args.override}; "
        f"total {_hms(elapsed)}.", "",
        "## Plots", "", *[f"- ![{p.stem}]({p.name})" for p in pngs], "",
    ])
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(json_safe({
        "settings": {**vars(args), "recipes": recipes, "val_prompts": n_val_prompts,
                     "rollouts": {r: [args.rollouts_per_step // settings[r]["n"], settings[r]["n"]] for r in recipes}},
        "target": target,
        "recipes": aggs,
        "runs": [{"recipe": r, "seed": s, **st} for (r, s), st in stats.items()],
        "findings": findings,
        "failed": failed,
        "claims": [asdict(c) for c in CLAIMS],
        "elapsed_s": elapsed,
    }), indent=1, default=str, allow_nan=False))
    print(text, flush=True)
    print(f"[learning] wrote {out / 'results.md'}, {out / 'results.json'} and {len(pngs)} plots", flush=True)
    return 1 if failed and not aggs else 0


if __name__ == "__main__":
    sys.exit(main())
