"""A real DOTS predictor for the CPU benchmarks: the adapter trained offline, as the DOTS paper
does, from rollouts of *other* policies on the same questions, with its held-out Pearson.

DOTS (Sun et al., arXiv 2506.05316 §3, ``../shared/docs/PAPERS.md`` §2) predicts a question's
adaptive difficulty under the current policy from a measured reference set by attention over
frozen-LM embeddings mapped by an adapter. The paper trains that adapter once, offline, on
pass rates of several other models on the same training questions (public code,
``adaptive_difficulty_prediction/train.py``: one group per model, 256 references per batch
from the group, BCE, 20 epochs, lr 1e-3, batch 256) and reports Pearson 0.70-0.78 on unseen
questions (0.07-0.27 for raw embeddings). Here:

1. **Policies** (:func:`train_policies`): SFT warm starts of the benchmark's tiny model
   (:func:`benchmarks.learning_setup.build_setup`'s ``base_model`` and ``sft`` split) with
   other seeds and other stopping accuracies than the benchmark's own warm start; the
   ``train`` ones feed the adapter, the ``unseen`` ones (and the benchmark's warm start
   itself, the policy RL starts from) are only evaluated.
2. **Rollouts** (:func:`measure_pass_rates`): every policy answers every RL training question
   ``samples`` times at the RL temperature (HF sampling, graded by the project's math
   grader); difficulty d = 1 - pass rate, written as DOTS rounds files (one ``step`` per
   policy, ``index`` = training-parquet row) by :func:`recipe.stages.dots.write_round`.
3. **Embeddings**: ``python -m recipe.dots embed`` of the training parquet with the frozen
   encoder the run will use (``dots.encoder``; default here the benchmark's warm start, the
   same model a run embeds with when ``dots.encoder`` is null).
4. **Adapter**: ``python -m recipe.dots train-adapter --holdout-questions F --eval-rounds ...``:
   a share F of the questions is never trained on; the tool prints the held-out Pearson of
   the adapter and of the identity projection (the no-adapter baseline), for the training
   policies and for the unseen ones. Everything is cached under ``<out>/dots_adapter-<hash>``.

Use in a run (the printed overrides; :func:`dots_overrides`)::

    python benchmarks/dots_adapter.py --task spread     # the data-efficiency benchmark's task
    python -m recipe.main recipe=grpo_dots_rr ... dots.adapter=<out>/adapter.pt dots.encoder=<warm_model>

From Python: ``res = build_adapter(build_setup(cfg)); overrides = dots_overrides(res)``.
Learning-setup flags (``--task``, ``--min-digits`` ...) select the task exactly as
``benchmarks/learning_setup.py`` does.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

#: Policies whose rollouts train the adapter: (SFT data-order seed, SFT steps), checkpoints of
#: one chained SFT run (each leg continues the previous one: 700, 1200, 1800 steps), with other
#: seeds than the benchmark's warm start (seed 0, up to 1500 steps) and skill levels below and
#: above it, as the paper's several models.
TRAIN_POLICIES: tuple[tuple[int, int], ...] = ((101, 700), (102, 500), (103, 600))
#: Extra policies only evaluated (never trained on; SFT from the base model), besides the
#: benchmark's own warm start, which is always evaluated.
UNSEEN_POLICIES: tuple[tuple[int, int], ...] = ()
VERSION = 1


@dataclass(frozen=True)
class AdapterBenchConfig:
    """Settings (all enter the cache key with the learning setup's key).

    Attributes:
        train_policies / unseen_policies: (SFT seed, SFT steps) of each policy.
        samples: rollouts per question and policy (the paper's reference rollouts: 8).
        temperature: sampling temperature of the rollouts (None: the setup's RL temperature).
        holdout_questions: share of the questions never trained on (held-out Pearson).
        epochs, lr, batch_size, ref_size, hidden: adapter training (paper: 20, 1e-3, 256, 256, 896).
        seed: adapter training, question split and reference draws.
        encoder: frozen embedding model (None: the setup's warm start).
    """

    train_policies: tuple[tuple[int, int], ...] = TRAIN_POLICIES
    unseen_policies: tuple[tuple[int, int], ...] = UNSEEN_POLICIES
    samples: int = 8
    temperature: float | None = None
    holdout_questions: float = 0.3
    epochs: int = 20
    lr: float = 1e-3
    batch_size: int = 256
    ref_size: int = 256
    hidden: int = 896
    seed: int = 0
    encoder: str | None = None

    def key(self, setup_key: str) -> str:
        blob = json.dumps({"v": VERSION, "setup": setup_key, **asdict(self)}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:10]


@dataclass
class AdapterResult:
    """What :func:`build_adapter` made: the adapter file, the encoder it expects, the held-out
    evaluation (the tool's ``--report``) and the folder holding rounds files and policies."""

    adapter: Path
    encoder: Path
    report: dict
    root: Path
    timings_s: dict = field(default_factory=dict)


def _log(msg: str, verbose: bool = True) -> None:
    if verbose:
        print(f"[dots_adapter] {msg}", flush=True)


def train_policies(setup, policies, root: Path, chain: bool = True, verbose: bool = True) -> dict[str, Path]:
    """SFT policies of the setup's base model with other seeds / stopping accuracies.

    Args:
        setup: :class:`benchmarks.learning_setup.LearningSetup`.
        policies: (seed, steps) pairs (SFT steps of this leg when ``chain``).
        root: models go to ``root/policy-s<seed>-n<steps>`` (reused when complete).
        chain: each policy continues from the previous one (checkpoints of one run, about the
            cost of the last one alone); else each starts from the base model.

    Returns:
        policy name -> model directory.
    """
    from benchmarks.sft import SFTConfig, train_sft
    from recipe.models import is_complete_model_dir

    cfg = setup.info["config"]
    out = {}
    start = Path(setup.base_model)
    total = 0
    for seed, steps in policies:
        total = total + steps if chain else steps
        name = f"policy-s{seed}-n{total}"
        path = root / name
        if not is_complete_model_dir(path):
            t = time.perf_counter()
            sft = SFTConfig(steps=steps, lr=cfg["sft_lr"], batch_size=cfg["sft_batch_size"],
                            warmup_steps=cfg["sft_warmup_steps"], seed=seed, response_template="{solution}",
                            threads=cfg["threads"])
            res = train_sft(start, setup.data["sft"], path, sft, eval_data=setup.data["dev"], verbose=False)
            _log(f"{name}: {res.steps} SFT steps from {start.name} in {time.perf_counter() - t:.0f} s", verbose)
        out[name] = path
        start = path if chain else start
    return out


def measure_pass_rates(model_dir: Path, parquet: Path, samples: int, temperature: float, max_new_tokens: int,
                       seed: int = 0, threads: int = 1) -> list[float]:
    """Per-question pass rate of ``model_dir`` on every row of ``parquet``: ``samples`` responses
    each at ``temperature`` (plain sampling as verl's rollout), graded by the project's grader.

    Returns:
        [N] floats in [0, 1], row order of the parquet.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from benchmarks.sft import generate, load_pairs
    from recipe.reward.grader import get_grader
    from recipe.reward.math_reward import answer_style

    torch.set_num_threads(threads)
    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    pairs = load_pairs(parquet)
    rows = [p for p in pairs for _ in range(samples)]
    state = torch.get_rng_state()
    try:
        torch.manual_seed(seed)
        responses = generate(model, tok, [r["messages"] for r in rows], temperature, max_new_tokens, batch_size=128)
    finally:
        torch.set_rng_state(state)
    grades = get_grader().grade_batch([(resp, r["ground_truth"], answer_style(r["data_source"]))
                                       for resp, r in zip(responses, rows)])
    correct = [float(g.correct) for g in grades]
    return [sum(correct[i * samples:(i + 1) * samples]) / samples for i in range(len(pairs))]


def _rounds_file(path: Path, group: int, texts: list[str], pass_rates: list[float], samples: int) -> None:
    from recipe.stages.dots import write_round

    path.unlink(missing_ok=True)
    write_round(path, group, list(range(len(texts))), texts, [1.0 - p for p in pass_rates], samples)


def _dots_cli(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "recipe.dots", *args], cwd=REPO, check=True)


def build_adapter(setup, cfg: AdapterBenchConfig = AdapterBenchConfig(), out: str | Path | None = None,
                  force: bool = False, verbose: bool = True) -> AdapterResult:
    """Policies, their rollouts, embeddings and the adapter for ``setup`` (module docstring).

    Args:
        setup: :class:`benchmarks.learning_setup.LearningSetup` (the benchmark's task and warm start).
        cfg: settings. out: parent folder (default: the setup's folder). force: redo every step.

    Returns:
        :class:`AdapterResult` (``report["heldout"]`` holds the Pearson values).
    """
    from recipe.stages.dots import question_texts

    root = Path(out or setup.root) / f"dots_adapter-{cfg.key(setup.info['key'])}"
    root.mkdir(parents=True, exist_ok=True)
    report_path, adapter = root / "report.json", root / "adapter.pt"
    encoder = Path(cfg.encoder) if cfg.encoder else Path(setup.warm_model)
    if not force and report_path.is_file() and adapter.is_file():
        _log(f"reusing {root}", verbose)
        return AdapterResult(adapter, encoder, json.loads(report_path.read_text()), root)
    scfg = setup.info["config"]
    temperature = scfg["temperature"] if cfg.temperature is None else cfg.temperature
    timings: dict[str, float] = {}
    t = time.perf_counter()
    trained = train_policies(setup, cfg.train_policies, root / "policies", verbose=verbose)
    unseen = train_policies(setup, cfg.unseen_policies, root / "policies", chain=False, verbose=verbose)
    unseen["warm_start"] = Path(setup.warm_model)
    timings["policies_s"] = time.perf_counter() - t

    texts = question_texts(setup.data["train"])
    t = time.perf_counter()
    files: dict[str, list[Path]] = {"train": [], "unseen": []}
    summary = {}
    for kind, policies in (("train", trained), ("unseen", unseen)):
        for name, path in policies.items():
            group = len(summary) + 1
            f = root / "rounds" / f"{kind}-{name}.jsonl"
            if force or not f.is_file():
                t1 = time.perf_counter()
                rates = measure_pass_rates(path, setup.data["train"], cfg.samples, temperature,
                                           scfg["max_new_tokens"], seed=cfg.seed + group, threads=scfg["threads"])
                f.parent.mkdir(parents=True, exist_ok=True)
                _rounds_file(f, group, texts, rates, cfg.samples)
                _log(f"{name}: pass rate {sum(rates) / len(rates):.3f} over {len(rates)} questions x {cfg.samples} "
                     f"(T = {temperature:g}) in {time.perf_counter() - t1:.0f} s", verbose)
            recs = [json.loads(x) for x in f.read_text().splitlines() if x.strip()]
            d = [r["difficulty"] for r in recs]
            summary[name] = {"kind": kind, "group": group, "pass_rate": 1 - sum(d) / len(d),
                             "all_correct": sum(x == 0 for x in d) / len(d), "all_wrong": sum(x == 1 for x in d) / len(d)}
            files[kind].append(f)
    timings["rollouts_s"] = time.perf_counter() - t

    t = time.perf_counter()
    emb = root / "embeddings.npy"
    _dots_cli("embed", "--data", str(setup.data["train"]), "--model", str(encoder),
              "--cache-dir", str(root / "cache"), "--out", str(emb))
    timings["embed_s"] = time.perf_counter() - t
    t = time.perf_counter()
    tool_report = root / "heldout.json"
    _dots_cli("train-adapter", "--rounds", *map(str, files["train"]), "--eval-rounds", *map(str, files["unseen"]),
              "--embeddings", str(emb), "--out", str(adapter), "--holdout-questions", str(cfg.holdout_questions),
              "--epochs", str(cfg.epochs), "--lr", str(cfg.lr), "--batch-size", str(cfg.batch_size),
              "--ref-size", str(cfg.ref_size), "--hidden", str(cfg.hidden), "--seed", str(cfg.seed),
              "--report", str(tool_report))
    timings["adapter_s"] = time.perf_counter() - t
    report = {**json.loads(tool_report.read_text()), "policies": summary, "temperature": temperature,
              "samples": cfg.samples, "setup": str(setup.root), "encoder": str(encoder),
              "timings_s": {k: round(v, 1) for k, v in timings.items()}}
    report_path.write_text(json.dumps(report, indent=1) + "\n")
    return AdapterResult(adapter, encoder, report, root, timings)


def dots_overrides(result: AdapterResult) -> list[str]:
    """Hydra overrides that make a run use this adapter with the encoder it was trained on."""
    return [f"dots.adapter={result.adapter}", f"dots.encoder={result.encoder}"]


def summary_table(report: dict) -> str:
    """Markdown: held-out Pearson of the adapter vs the identity projection, per policy set."""
    lines = ["| policies | held-out predictions | adapter r | adapter r, per-policy mean | identity r |",
             "|---|---:|---:|---:|---:|"]
    for name, res in report["heldout"].items():
        a, i = res["adapter"], res["identity"]
        lines.append(f"| {name.replace('_', ' ')} | {a['n_queries']} ({a['n_groups']} policies) | {a['pearson']:.3f} "
                     f"| {a['pearson_group_mean']:.3f} | {i['pearson']:.3f} |")
    lines += ["", "| policy | kind | pass rate | all correct | all wrong |", "|---|---|---:|---:|---:|"]
    for name, p in report["policies"].items():
        lines.append(f"| {name} | {p['kind']} | {p['pass_rate']:.3f} | {p['all_correct']:.3f} | {p['all_wrong']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Command line: build (or reuse) the learning setup, then the adapter; print the table and overrides."""
    from benchmarks import learning_setup as ls

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False, allow_abbrev=False)
    p.add_argument("--help-adapter", action="help", help="this script's own flags")
    p.add_argument("--samples", type=int, default=AdapterBenchConfig.samples)
    p.add_argument("--rollout-temperature", type=float, default=None,
                   help="temperature of the policies' rollouts (default: the setup's RL temperature)")
    p.add_argument("--holdout-questions", type=float, default=AdapterBenchConfig.holdout_questions)
    p.add_argument("--epochs", type=int, default=AdapterBenchConfig.epochs)
    p.add_argument("--hidden", type=int, default=AdapterBenchConfig.hidden)
    p.add_argument("--adapter-seed", type=int, default=0)
    p.add_argument("--encoder", default=None, help="frozen embedding model (default: the setup's warm start)")
    p.add_argument("--policies", type=int, default=len(TRAIN_POLICIES),
                   help=f"how many of the training policies {TRAIN_POLICIES} to use")
    p.add_argument("--adapter-out", default=None, help="parent folder (default: the setup's folder)")
    p.add_argument("--redo", action="store_true", help="redo policies, rollouts and adapter")
    args, rest = p.parse_known_args(argv)
    sargs = ls._parser().parse_args(rest)
    setup = ls.build_setup(ls.config_from_args(sargs), sargs.out, force=sargs.force)
    cfg = AdapterBenchConfig(train_policies=TRAIN_POLICIES[:args.policies], samples=args.samples,
                             temperature=args.rollout_temperature, holdout_questions=args.holdout_questions,
                             epochs=args.epochs, hidden=args.hidden, seed=args.adapter_seed, encoder=args.encoder)
    t0 = time.time()
    res = build_adapter(setup, cfg, args.adapter_out, force=args.redo)
    print(summary_table(res.report))
    print(f"\nadapter: {res.adapter} ({time.time() - t0:.0f} s; timings {res.report.get('timings_s')})")
    print("overrides for python -m recipe.main:\n  " + " \\\n  ".join(dots_overrides(res)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
