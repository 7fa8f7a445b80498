"""Driver of ``scripts/gpu_check.sh``: the GPU smoke check, a pass / fail table in minutes.

On a lent GPU machine (no internet) it runs, each under ``timeout`` and inside one overall
budget (default 8 minutes), and prints one row per check (check | status | seconds | detail):

- ``env``: which interpreter runs the checks, torch / CUDA / GPUs, vLLM, verl, Ray; what is
  missing is installed from the package index only when pip can reach one (``--no-install``),
  and the checks that need it are reported ``skip: <why>`` otherwise;
- ``data``, ``models``: GSM8K / MATH500 parquet and the tiny models, built locally, one with
  the real Qwen2.5 tokenizer (head size 64 on GPU, which vLLM's kernels accept);
- ``eval``: ``python -m recipe.eval`` with the vLLM backend (run alone on the GPU);
- ``grpo_3steps``: 3 GRPO steps with the vLLM rollout, Qwen2.5-tokenizer model; the weight
  sync is judged by the rollout-vs-actor probability correlation verl logs every step
  (vLLM starts from dummy weights, so a missing sync shows at step 1);
- ``same_seed``: GRPO for 2 steps twice with the same ``seed=``; the max abs difference of
  ``critic/score/mean`` and ``response_length/mean`` is reported ("differs" when not 0);
- ``recipe_<name>``: 1 step of every recipe of ``conf/recipe/`` (2 GPUs when there are 2);
- ``same_seed_fd``: the same-seed pair again with verl's ``full_determinism`` on (rollout,
  actor, reference), last, when the budget still allows.

On GPU every run is small (8 prompts x n = 4, 128 new tokens, hidden 256, vLLM eager with
10 % of the GPU and a fixed 1 GiB KV cache), and up to ``--jobs`` (4) runs share the GPU:
a fixed KV cache skips vLLM's start-up memory profiling, which fails when a neighbour
frees memory meanwhile. The recipe runs use the e2e tests' parity reward (mixed groups
from a random model, so filters, RAFT and DPO pairs have something to train on).

Statuses: pass | fail | skip | differs. Logs go to ``--out`` (default ``$OUT`` if set, else
``artifacts/gpu_check``): ``summary.md`` / ``summary.json`` (rewritten after every check),
``logs/<check>.log``; with ``$OUT`` the logs are packed into ``gpu_check_logs.tar.gz`` at
the end (that folder brings back at most 8 files). Runs and eval outputs go to
``artifacts/gpu_check/work``.

``--cpu`` runs the same checks on the CPU (``device=cpu``, rollout ``hf``), ``--dry-run``
prints the commands, ``--only grpo_3steps,same_seed`` selects checks (``recipe_*`` works).
This file uses the standard library only: it runs under any python3, the checks under
the interpreter that holds torch and verl. Pure helpers (table, comparisons, verdicts,
budget) are tested in ``tests/unit/tools/test_gpu_check.py``.
"""

from __future__ import annotations

import argparse
import fnmatch
import json
import math
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
STATUSES = ("pass", "fail", "skip", "differs")
#: seconds kept back from the budget: the 20 s between a timeout's SIGTERM and SIGKILL,
#: the summary and packing the logs
RESERVE_S = 30
#: the metrics the same-seed check compares (the brief's two)
SAME_SEED_KEYS = ("critic/score/mean", "response_length/mean")
#: losses that must be finite when logged
LOSS_KEYS = ("actor/pg_loss", "actor/loss", "critic/vf_loss", "dpo/loss")
CORR_KEY = "training/rollout_actor_probs_pearson_corr"
DETAIL_CHARS = 240
PARITY_REWARD = ROOT / "tests" / "e2e" / "parity_reward.py"


# ============================================================================ pure helpers
@dataclass
class Result:
    """One row of the table."""

    check: str
    status: str
    seconds: float = 0.0
    detail: str = ""

    def __post_init__(self):
        if self.status not in STATUSES:
            raise ValueError(f"status {self.status!r} not in {STATUSES}")


def format_table(results: list[Result]) -> str:
    """A Markdown table, columns check | status | seconds | detail, padded to line up.

    Details are put on one line (newlines and ``|`` replaced) and cut to DETAIL_CHARS.
    """
    header = ("check", "status", "seconds", "detail")
    rows = [
        (r.check, r.status, f"{r.seconds:.1f}", clean_detail(r.detail))
        for r in results
    ]
    widths = [max([len(header[i])] + [len(row[i]) for row in rows]) for i in range(3)]

    def line(cells, seconds_right=True):
        c, s, sec, d = cells
        sec = sec.rjust(widths[2]) if seconds_right else sec.ljust(widths[2])
        return f"| {c.ljust(widths[0])} | {s.ljust(widths[1])} | {sec} | {d} |"

    sep = f"|{'-' * (widths[0] + 2)}|{'-' * (widths[1] + 2)}|{'-' * (widths[2] + 1)}:|---|"
    return "\n".join([line(header, seconds_right=False), sep] + [line(r) for r in rows])


def clean_detail(text: str, limit: int = DETAIL_CHARS) -> str:
    """One line, no table separators, at most ``limit`` characters."""
    text = " ".join(str(text).replace("|", "/").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def count_statuses(results: list[Result]) -> dict:
    """``{status: count}`` for every status, zeros included."""
    return {s: sum(r.status == s for r in results) for s in STATUSES}


_ERROR_RE = re.compile(
    r"(\[recipe\] error:|\b[A-Z]\w*(Error|Exception|Interrupt)\b|\bassert(ion)?\b|CUDA out of memory|Killed|"
    r"^error:|No such file|not found)"
)
_NOISE_RE = re.compile(r"(Warning\b|warnings\.warn|DeprecationWarning|^\s*warn)", re.IGNORECASE)


def last_error_line(text: str) -> str:
    """The last line of a log that looks like an error (exception, ``[recipe] error:``,
    assertion, OOM), warnings left out; else the last non-empty line; "" for an empty log."""
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if _ERROR_RE.search(ln) and not _NOISE_RE.search(ln):
            return clean_detail(ln, 200)
    return clean_detail(lines[-1], 200) if lines else ""


def read_metrics(path) -> dict:
    """``{step: metrics}`` from a ``metrics.jsonl`` (``{"step", "data"}`` per line); the
    last line of a step wins (a resumed run appends); missing file -> {}; bad lines skipped."""
    out: dict = {}
    try:
        text = Path(path).read_text()
    except OSError:
        return out
    for line in text.splitlines():
        try:
            row = json.loads(line)
            out[int(row["step"])] = dict(row["data"])
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _num(x) -> float | None:
    try:
        return float(x)
    except (TypeError, ValueError):
        return None


def compare_metrics(a: dict, b: dict, keys=SAME_SEED_KEYS) -> dict:
    """Max abs difference per key over the steps both runs logged.

    Args:
        a, b: ``{step: metrics}`` of two runs (:func:`read_metrics`).
        keys: Metric names to compare.

    Returns:
        ``{"steps": common steps, "only_a": steps only in a, "only_b": ..., "diff": {key:
        max |a - b| or None when the key is missing in a step of either run; nan when a
        value is nan in exactly one run, 0 when both are nan}}``.
    """
    common = sorted(set(a) & set(b))
    diff: dict = {}
    for key in keys:
        ds = []
        for step in common:
            x, y = _num(a[step].get(key)), _num(b[step].get(key))
            if x is None or y is None:
                ds = None
                break
            if math.isnan(x) or math.isnan(y):
                ds.append(0.0 if math.isnan(x) and math.isnan(y) else math.nan)
            else:
                ds.append(abs(x - y))
        if not ds:
            diff[key] = None
        elif any(math.isnan(d) for d in ds):
            diff[key] = math.nan
        else:
            diff[key] = max(ds)
    return {"steps": common, "only_a": sorted(set(a) - set(b)), "only_b": sorted(set(b) - set(a)), "diff": diff}


def fmt(x, digits: int = 4) -> str:
    """A short number: nan / None as such, small floats in %g."""
    if x is None:
        return "n/a"
    try:
        x = float(x)
    except (TypeError, ValueError):
        return str(x)
    if math.isnan(x):
        return "nan"
    if x == int(x) and abs(x) < 1e6:
        return str(int(x))
    return f"{x:.{digits}g}"


def judge_same_seed(a: dict, b: dict, want_steps: int, keys=SAME_SEED_KEYS) -> tuple:
    """Verdict of the same-seed check: ``(status, detail)``.

    pass: both runs logged steps 1..want_steps and every compared metric is identical;
    differs: all steps logged but some difference is not 0 (the numbers are in the detail);
    fail: a run is missing steps or a metric.
    """
    want = list(range(1, want_steps + 1))
    for tag, rows in (("run a", a), ("run b", b)):
        if sorted(rows) != want:
            return "fail", f"{tag} logged steps {sorted(rows)}, expected {want}"
    cmp = compare_metrics(a, b, keys)
    missing = [k for k, v in cmp["diff"].items() if v is None]
    if missing:
        return "fail", f"metric(s) missing: {', '.join(missing)}"
    parts = [f"max abs diff {k} {fmt(v, 3)}" for k, v in cmp["diff"].items()]
    per_step = "; ".join(
        f"step {s}: " + ", ".join(f"{fmt(a[s].get(k), 4)} vs {fmt(b[s].get(k), 4)}" for k in keys) for s in want
    )
    identical = all(v == 0.0 for v in cmp["diff"].values())
    return ("pass" if identical else "differs"), ", ".join(parts) + f" ({per_step})"


def judge_train(rows: dict, want_steps: int, min_corr: float | None = None) -> tuple:
    """Verdict of a training run from its metrics: ``(status, detail)``.

    fail when a step of 1..want_steps is missing, a logged loss (LOSS_KEYS) is not finite,
    or (``min_corr`` given) the rollout-vs-actor probability correlation of a step is
    missing or below ``min_corr`` (the rollout's weights are not the actor's: no weight sync).
    """
    want = list(range(1, want_steps + 1))
    got = sorted(rows)
    if got[: len(want)] != want:
        return "fail", f"logged steps {got}, expected {want}"
    problems, parts = [], []
    for s in want:
        m = rows[s]
        if m.get("filter/skipped_update") or m.get("dpo/skipped_update"):
            continue  # no update this step: its losses are placeholders
        for key in LOSS_KEYS:
            v = _num(m.get(key)) if key in m else None
            if key in m and (v is None or not math.isfinite(v)):
                problems.append(f"{key}={m.get(key)} at step {s}")
    if min_corr is not None:
        corr = [_num(rows[s].get(CORR_KEY)) for s in want]
        if any(c is None for c in corr):
            problems.append(f"{CORR_KEY} not logged (rollout log-probs off?)")
        else:
            low = [(s, c) for s, c in zip(want, corr) if not (c >= min_corr)]
            if low:
                problems.append(
                    "rollout/actor prob corr " + ", ".join(f"{fmt(c, 3)} at step {s}" for s, c in low)
                    + f" < {min_corr}: rollout weights are not the actor's (weight sync?)"
                )
        parts.append("rollout/actor prob corr " + "/".join(fmt(c, 5) for c in corr))
        kl = [_num(rows[s].get("rollout_corr/k3_kl")) for s in want]
        if any(k is not None for k in kl):
            parts.append("k3_kl " + "/".join(fmt(k, 2) for k in kl))
        sync = [_num(rows[s].get("timing_s/update_weights")) for s in want]
        if any(x is not None for x in sync):
            parts.append("update_weights s " + "/".join(fmt(x, 2) for x in sync))
    last = rows[want[-1]]
    for key, label in (("critic/score/mean", "score"), ("reward/acc", "acc"), ("actor/pg_loss", "pg_loss"),
                       ("dpo/loss", "dpo_loss"), ("critic/vf_loss", "vf_loss"), ("response_length/mean", "resp_len")):
        if key in last:
            parts.append(f"{label} {fmt(last[key], 3)}")
    skipped = [s for s in want if rows[s].get("filter/skipped_update")]
    if skipped:
        parts.append(f"update skipped at step(s) {skipped} (every group uniform)")
    times = [_num(rows[s].get("timing_s/step")) for s in want]
    if all(t is not None for t in times):
        parts.append("s/step " + "/".join(fmt(t, 3) for t in times))
    if problems:
        return "fail", "; ".join(problems + parts)
    return "pass", f"{want_steps} step(s); " + ", ".join(parts)


def judge_eval(results: dict | None, backend: str, expected_samples: int | None, n_samples: int) -> tuple:
    """Verdict of ``recipe.eval``: ``(status, detail)`` from its results.json and the number
    of lines of samples.jsonl."""
    if not results:
        return "fail", "no results.json"
    problems = []
    if results.get("backend") != backend:
        problems.append(f"backend {results.get('backend')!r}, expected {backend!r}")
    metrics = results.get("metrics") or {}
    bad = [k for k, v in metrics.items() if not (_num(v) is not None and 0.0 <= float(v) <= 1.0)]
    if not metrics:
        problems.append("no metrics")
    if bad:
        problems.append(f"out of [0, 1]: {', '.join(bad)}")
    if expected_samples is not None and n_samples != expected_samples:
        problems.append(f"{n_samples} samples, expected {expected_samples}")
    shown = ", ".join(f"{k} {fmt(v, 3)}" for k, v in sorted(metrics.items()) if k.startswith("average/"))
    detail = f"{backend}: {n_samples} samples; {shown}"
    return ("fail", "; ".join(problems) + "; " + detail) if problems else ("pass", detail)


class Budget:
    """The overall time budget: a check starts only when at least its ``need`` seconds are
    left (after RESERVE_S for the summary), and runs under ``min(want, what is left)``."""

    def __init__(self, total_s: float, reserve_s: float = RESERVE_S, clock: Callable[[], float] = time.monotonic):
        self.total_s, self.reserve_s, self.clock = float(total_s), float(reserve_s), clock
        self.start = clock()

    def elapsed(self) -> float:
        return self.clock() - self.start

    def remaining(self) -> float:
        return self.total_s - self.elapsed()

    def grant(self, want_s: float, need_s: float) -> int | None:
        """Seconds a check may run (an int >= 1), or None when fewer than ``need_s`` are left."""
        left = self.remaining() - self.reserve_s
        if left < need_s or left < 1:
            return None
        return int(max(1, min(want_s, left)))


def select(names: list, only: str | None, skip: str | None) -> list:
    """Names kept by ``--only`` / ``--skip`` (comma-separated names or fnmatch patterns).

    Raises:
        ValueError: naming a pattern that matches no check.
    """
    def patterns(spec):
        return [p.strip() for p in (spec or "").split(",") if p.strip()]

    keep = list(names)
    if only:
        pats = patterns(only)
        for p in pats:
            if not any(fnmatch.fnmatchcase(n, p) for n in names):
                raise ValueError(f"--only {p!r} matches no check (checks: {', '.join(names)})")
        keep = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    for p in patterns(skip):
        if not any(fnmatch.fnmatchcase(n, p) for n in names):
            raise ValueError(f"--skip {p!r} matches no check (checks: {', '.join(names)})")
        keep = [n for n in keep if not fnmatch.fnmatchcase(n, p)]
    return keep


def missing_for(needs, have: dict) -> list:
    """Capabilities of ``needs`` that the probed interpreter lacks (``have``: its ``have`` map)."""
    return [n for n in needs if not have.get(n)]


# ============================================================================ environment
PROBE = r"""
import importlib, importlib.util, json, os, sys
out = {"python": sys.executable, "python_version": sys.version.split()[0], "versions": {}, "have": {}}
def dist(name):
    try:
        from importlib.metadata import version
        return version(name)
    except Exception:
        return None
for key, d in (("verl", "verl"), ("vllm", "vllm"), ("ray", "ray"), ("hydra", "hydra-core"),
               ("transfer_queue", "TransferQueue"), ("transformers", "transformers"),
               ("flash_attn", "flash-attn"), ("math_verify", "math-verify"), ("pebble", "pebble"),
               ("pyarrow", "pyarrow"), ("project", "verl-recipe-sample-efficient")):
    out["versions"][key] = dist(d)
try:
    import torch
    out["versions"]["torch"] = torch.__version__
    out["cuda"] = bool(torch.cuda.is_available())
    out["cuda_devices"] = torch.cuda.device_count() if out["cuda"] else 0
    out["gpu_name"] = torch.cuda.get_device_name(0) if out["cuda"] else None
except Exception as e:
    out["versions"]["torch"] = None
    out["cuda"], out["cuda_devices"], out["gpu_name"] = False, 0, None
    out["torch_error"] = repr(e)[:200]
spec = importlib.util.find_spec("recipe")
out["recipe_path"] = (spec.origin if spec else None)
try:
    from importlib.metadata import entry_points
    eps = entry_points()
    group = eps.select(group="verl.plugins") if hasattr(eps, "select") else eps.get("verl.plugins", [])
    out["plugins"] = sorted(ep.name for ep in group)
except Exception:
    out["plugins"] = []
v = out["versions"]
out["have"] = {
    "torch": bool(v["torch"]),
    "cuda": out["cuda"],
    "vllm": bool(v["vllm"]),
    "verl": bool(v["verl"]),
    "trainer_deps": all(v[k] for k in ("ray", "hydra", "transfer_queue", "math_verify", "pebble")),
    "recipe": bool(out["recipe_path"]) and bool(v["pyarrow"]) and bool(v["transformers"]),
    "plugin": "recipe_verl_patches" in out["plugins"],
    "flash_attn": bool(v["flash_attn"]),
}
print("GPU_CHECK_PROBE " + json.dumps(out))
"""

#: capabilities each kind of check needs (mode-dependent ones added in build_plan)
NEEDS_PREP = ("torch", "recipe")
NEEDS_TRAIN = ("torch", "verl", "trainer_deps", "recipe")


def run_env(root: Path = ROOT) -> dict:
    """Environment for the checks: RECIPE_ARTIFACTS, the checkout on PYTHONPATH, offline hub,
    unbuffered output, and RECIPE_SHARED_DIR when a shared folder is found."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(root)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
    env.setdefault("RECIPE_ARTIFACTS", str(root / "artifacts"))
    env.update(PYTHONUNBUFFERED="1", RAY_DEDUP_LOGS="0", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    shared = find_shared(root)
    if shared:
        env["RECIPE_SHARED_DIR"] = str(shared)
    return env


def bundle_dir(root: Path = ROOT) -> Path:
    return root / "artifacts" / "gpu_check" / "bundle" / "shared"


def find_shared(root: Path = ROOT) -> Path | None:
    """The folder holding ``data/`` and ``tokenizers/``: $RECIPE_SHARED_DIR, ../shared beside
    the checkout, ./shared inside it, or the bundle ``--bundle`` writes (carried to a GPU
    machine, where ../shared does not travel)."""
    cands = [os.environ.get("RECIPE_SHARED_DIR"), root.parent / "shared", root / "shared", bundle_dir(root)]
    for c in cands:
        if c and (Path(c) / "data").is_dir():
            return Path(c).resolve()
    return None


def probe(python: str, env: dict, timeout: int = 120) -> dict:
    """Run PROBE under ``python``; ``{"error": ...}`` when it cannot."""
    try:
        p = subprocess.run([python, "-c", PROBE], check=False, env=env, cwd=str(ROOT), capture_output=True, text=True,
                           timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"python": python, "error": repr(e)[:200], "have": {}}
    for line in p.stdout.splitlines():
        if line.startswith("GPU_CHECK_PROBE "):
            return json.loads(line[len("GPU_CHECK_PROBE "):])
    return {"python": python, "error": last_error_line(p.stderr + p.stdout) or f"rc {p.returncode}", "have": {}}


def count_gpus() -> tuple:
    """``(count, names)`` from ``nvidia-smi -L``; (0, "") when it is absent."""
    exe = shutil.which("nvidia-smi")
    if not exe:
        return 0, "nvidia-smi not found"
    try:
        out = subprocess.run([exe, "-L"], check=False, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        return 0, repr(e)[:100]
    gpus = [ln for ln in out.splitlines() if ln.startswith("GPU ")]
    return len(gpus), (gpus[0].split(":", 1)[1].split("(")[0].strip() if gpus else "")


def candidates(args) -> list:
    """Interpreters to probe, best first, without duplicates."""
    if args.python:
        return [args.python]
    cands = [str(ROOT / ".venv" / "bin" / "python"), shutil.which("python3"), shutil.which("python"), sys.executable]
    seen, out = set(), []
    for c in cands:
        if c and os.path.exists(c):
            key = os.path.realpath(c)
            if key not in seen:
                seen.add(key)
                out.append(c)
    return out


def score_env(e: dict, gpu: bool) -> tuple:
    """Sort key: interpreters that can run more of the checks first."""
    h = e.get("have") or {}
    core = ("cuda", "vllm", "verl", "trainer_deps", "recipe") if gpu else ("torch", "verl", "trainer_deps", "recipe")
    return (sum(bool(h.get(k)) for k in core), bool(h.get("plugin")), bool(h.get("torch")))


def describe_env(e: dict, gpus: int, gpu_name: str) -> str:
    v = e.get("versions") or {}
    if e.get("error"):
        return f"{e.get('python')}: {e['error']}"
    torch = f"torch {v.get('torch')}" + (f" cuda ({e.get('cuda_devices')} GPU {e.get('gpu_name')})" if e.get("cuda")
                                          else " (no CUDA)")
    parts = [f"python {e.get('python_version')} {e.get('python')}", torch, f"nvidia-smi: {gpus} GPU" + (f" ({gpu_name})" if gpu_name else "")]
    parts += [f"{k} {v.get(k) or 'missing'}" for k in ("vllm", "verl", "ray", "transformers")]
    parts.append("flash_attn " + (v.get("flash_attn") or "no (sdpa)"))
    parts.append("plugin " + ("yes" if (e.get("have") or {}).get("plugin") else "no"))
    return ", ".join(parts)


# ============================================================================ the plan
@dataclass
class Cmd:
    argv: list
    log: str  # file name under logs/


@dataclass
class Check:
    name: str
    cmds: list = field(default_factory=list)
    needs: tuple = ()
    after: tuple = ()  # checks that must pass first
    want_s: int = 300  # timeout wanted per command group
    need_s: int = 60  # least budget worth starting with
    exclusive: bool = False  # nothing else runs beside it (vLLM's start-up memory profiling)
    judge: Callable | None = None  # (check, rcs) -> (status, detail)
    run_dirs: list = field(default_factory=list)  # cleaned before the run


@dataclass
class Settings:
    gpu: bool
    python: str
    work: Path
    artifacts: Path
    hidden: int
    ranks: int
    qwen_model: str
    seed: int
    flash_attn: bool
    overrides: list
    same_seed_overrides: list
    min_corr: float
    kv_cache_bytes: int
    recipes: list


def model_dir(s: Settings, model: str) -> Path:
    tok = "qwen2.5" if model == "tiny_qwen" else "local"
    return s.artifacts / "models" / f"tiny-{tok}-h{s.hidden}-l2-s0"


def train_overrides(s: Settings, name: str, model: str, steps: int, ranks: int = 1, extra=()) -> list:
    """Hydra overrides of one short training run (see the module docstring): the check's
    sizes, then ``extra`` (the check's own), then the user's ``--override`` (later wins)."""
    o = [
        f"device={'gpu' if s.gpu else 'cpu'}",
        f"model={model}",
        f"tiny_model.hidden_size={s.hidden}",
        f"paths.runs={s.work / 'runs'}",
        f"trainer.experiment_name=gc_{name}",
        f"trainer.total_training_steps={steps}",
        "trainer.test_freq=-1",
        "trainer.save_freq=-1",
        "trainer.val_before_train=false",
        "trainer.resume_mode=disable",
        f"trainer.n_gpus_per_node={ranks}",
    ]
    if s.gpu:
        o += [
            "data.train_batch_size=8",
            "data.max_prompt_length=256",
            "data.max_response_length=128",
            "data.dataloader_num_workers=0",
            "actor_rollout_ref.actor.ppo_mini_batch_size=8",
            "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=4",
            "critic.ppo_micro_batch_size_per_gpu=4",
            "actor_rollout_ref.rollout.name=vllm",
            "actor_rollout_ref.rollout.gpu_memory_utilization=0.1",
            "actor_rollout_ref.rollout.enforce_eager=true",
            "actor_rollout_ref.rollout.agent.num_workers=2",
            "dots.ref_size=16",
            "dots.ref_samples=4",
            "dots.holdout_size=8",
            "dots.batch_size=8",
        ]
        if s.kv_cache_bytes:
            # a fixed KV cache skips vLLM's start-up memory profiling, which fails when another
            # process on the same GPU frees memory meanwhile (the checks run side by side)
            o.append(f"++actor_rollout_ref.rollout.engine_kwargs.vllm.kv_cache_memory_bytes={s.kv_cache_bytes}")
        if not s.flash_attn:
            # verl's default attention is flash_attention_2; without the flash_attn package: sdpa
            o += [
                "++actor_rollout_ref.model.override_config.attn_implementation=sdpa",
                "actor_rollout_ref.model.use_remove_padding=false",
                "++critic.model.override_config.attn_implementation=sdpa",
                "critic.model.use_remove_padding=false",
            ]
    else:
        o += ["actor_rollout_ref.rollout.name=hf", "data.max_response_length=64"]
    return o + list(extra) + list(s.overrides)


def main_argv(s: Settings, overrides: list) -> list:
    return [s.python, "-m", "recipe.main", *overrides]


def build_plan(s: Settings) -> list:
    """Every check, in the order they start (dependencies before what needs them)."""
    gpu_needs = ("cuda", "vllm") if s.gpu else ()
    py = s.python
    models = {"tiny": model_dir(s, "tiny"), s.qwen_model: model_dir(s, s.qwen_model)}
    data = s.artifacts / "data"
    missing = [d for d, splits in (("gsm8k", ("train", "test")), ("math500", ("test",)))
               if not all((data / d / f"{x}.parquet").exists() for x in splits)]
    plan = [
        Check("data", [Cmd([py, "-m", "recipe.data", "--datasets", ",".join(missing), "--out-dir", str(data)],
                           "data.log")] if missing else [],
              needs=NEEDS_PREP, want_s=180, need_s=20, judge=judge_data),
        Check("models", [Cmd([py, "-m", "recipe.models", "--out", str(path), "--tokenizer",
                              "qwen2.5" if m == "tiny_qwen" else "local", "--hidden-size", str(s.hidden)],
                             f"models_{m}.log") for m, path in models.items()],
              needs=NEEDS_PREP, want_s=240, need_s=20, judge=judge_models),
    ]
    qdir = model_dir(s, s.qwen_model)
    eval_out = s.work / "eval"
    if s.gpu:
        ev = ["backend=vllm", "benchmarks=[gsm8k,math500]", "k=4", "pass_k=[1,4]", "max_problems=8",
              "max_tokens=128", "vllm.gpu_memory_utilization=0.2"]
        n_samples = 2 * 8 * 4
    else:
        ev = ["backend=hf", "benchmarks=[gsm8k]", "k=2", "pass_k=[1,2]", "max_problems=2", "max_tokens=32"]
        n_samples = 1 * 2 * 2
    plan.append(Check(
        "eval",
        [Cmd([py, "-m", "recipe.eval", f"model_path={qdir}", *ev, f"out_dir={eval_out}", "resume=false",
              f"paths.artifacts={s.artifacts}"], "eval.log")],
        needs=NEEDS_PREP + gpu_needs, after=("data", "models"), want_s=240, need_s=45, exclusive=s.gpu,
        judge=lambda c, rcs, _o=eval_out, _n=n_samples, _b=("vllm" if s.gpu else "hf"): judge_eval_dir(_o, _b, _n),
        run_dirs=[eval_out]))
    train_needs = NEEDS_TRAIN + gpu_needs
    g3 = train_overrides(s, "grpo_3steps", s.qwen_model, 3, extra=["actor_rollout_ref.actor.optim.lr=1e-3"])
    plan.append(Check("grpo_3steps", [Cmd(main_argv(s, g3), "grpo_3steps.log")], needs=train_needs,
                      after=("data", "models"), want_s=360, need_s=90,
                      judge=lambda c, rcs: judge_run(s, "grpo_3steps", 3, s.min_corr),
                      run_dirs=[s.work / "runs" / "gc_grpo_3steps"]))
    plan.append(same_seed_check(s, "same_seed", [], "", train_needs))
    for r in s.recipes:
        o = train_overrides(s, f"recipe_{r}", "tiny", 1, ranks=s.ranks,
                            extra=[f"recipe={r}", f"reward.custom_reward_function.path={PARITY_REWARD}"])
        plan.append(Check(f"recipe_{r}", [Cmd(main_argv(s, o), f"recipe_{r}.log")], needs=train_needs,
                          after=("data", "models"), want_s=300, need_s=75,
                          judge=lambda c, rcs, _r=r: judge_run(s, f"recipe_{_r}", 1, None),
                          run_dirs=[s.work / "runs" / f"gc_recipe_{r}"]))
    # last, so that it runs only when the budget allows: the same pair with verl's full
    # determinism (rollout: VLLM_BATCH_INVARIANT, deterministic torch; actor / ref alike)
    plan.append(same_seed_check(s, "same_seed_fd", FULL_DETERMINISM, "full_determinism (rollout, actor, ref)",
                                train_needs))
    return plan


#: verl's switches for deterministic kernels, rollout and training engines
FULL_DETERMINISM = ["actor_rollout_ref.rollout.full_determinism=true",
                    "actor_rollout_ref.actor.fsdp_config.full_determinism=true",
                    "actor_rollout_ref.ref.fsdp_config.full_determinism=true"]


def same_seed_check(s: Settings, name: str, extra: list, label: str, needs) -> Check:
    """Two identical 2-step GRPO runs with ``seed=s.seed`` (parity reward: mixed scores)."""
    cmds = []
    for tag in ("a", "b"):
        o = train_overrides(s, f"{name}_{tag}", s.qwen_model, 2, extra=[
            f"seed={s.seed}", f"reward.custom_reward_function.path={PARITY_REWARD}", *extra]) + list(
            s.same_seed_overrides)
        cmds.append(Cmd(main_argv(s, o), f"{name}_{tag}.log"))
    return Check(name, cmds, needs=needs, after=("data", "models"), want_s=300, need_s=90,
                 judge=lambda c, rcs: judge_same_seed_runs(s, name, label),
                 run_dirs=[s.work / "runs" / f"gc_{name}_{t}" for t in "ab"])


def judge_data(check, rcs):
    return "pass", "gsm8k, math500 parquet" + ("" if check.cmds else " (already there)")


def judge_models(check, rcs):
    if not all(rc == 0 for rc in rcs):
        return "fail", ""
    parts = []
    for cmd in check.cmds:
        out = Path(cmd.argv[cmd.argv.index("--out") + 1])
        try:
            info = json.loads((out / "recipe_build_info.json").read_text())
            parts.append(f"{out.name}: vocab {info.get('tokenizer_size'):,}, {info.get('num_parameters'):,} params")
        except (OSError, ValueError, TypeError):
            parts.append(out.name)
    return "pass", "; ".join(parts)


def judge_eval_dir(out: Path, backend: str, n_expected: int):
    try:
        results = json.loads((out / "results.json").read_text())
    except (OSError, ValueError):
        results = None
    try:
        n = sum(1 for ln in (out / "samples.jsonl").read_text().splitlines() if ln.strip())
    except OSError:
        n = 0
    return judge_eval(results, backend, n_expected, n)


def judge_run(s: Settings, name: str, steps: int, min_corr):
    return judge_train(read_metrics(s.work / "runs" / f"gc_{name}" / "metrics.jsonl"), steps, min_corr)


def judge_same_seed_runs(s: Settings, name: str = "same_seed", label: str = ""):
    a = read_metrics(s.work / "runs" / f"gc_{name}_a" / "metrics.jsonl")
    b = read_metrics(s.work / "runs" / f"gc_{name}_b" / "metrics.jsonl")
    status, detail = judge_same_seed(a, b, 2)
    flags = " ".join(x for x in [label, *s.same_seed_overrides] if x)
    return status, f"seed={s.seed}{' ' + flags if flags else ''}: {detail}"


# ============================================================================ running
def timeout_argv(argv: list, seconds: int) -> list:
    """``argv`` under coreutils ``timeout`` (SIGTERM, SIGKILL 20 s later): recipe.main
    shuts Ray down on SIGTERM."""
    return ["timeout", "-k", "20", str(int(seconds)), *argv] if shutil.which("timeout") else list(argv)


def run_one(argv: list, log: Path, seconds: int, env: dict, cwd: Path) -> int:
    """Run one command under ``timeout`` with its output in ``log``; its exit status
    (124 / 137 when the timeout hit)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as f:
        f.write("$ " + shlex.join(timeout_argv(argv, seconds)) + "\n")
        f.flush()
        try:
            p = subprocess.Popen(timeout_argv(argv, seconds), stdout=f, stderr=subprocess.STDOUT, env=env,
                                 cwd=str(cwd), start_new_session=True)
        except OSError as e:
            f.write(f"error: {e}\n")
            return 127
        try:
            return p.wait(timeout=seconds + 40)
        except subprocess.TimeoutExpired:  # no coreutils timeout, or it hung
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(p.pid, sig)
                except ProcessLookupError:
                    break
                try:
                    return p.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    continue
            return 137


class Runner:
    def __init__(self, plan, budget: Budget, jobs: int, env: dict, logs: Path, cwd: Path, report):
        self.plan, self.budget, self.jobs, self.env, self.logs, self.cwd = plan, budget, jobs, env, logs, cwd
        self.report = report  # called with each Result as it is known
        self.results: dict = {}
        self.stagger_s = 3.0  # between two starts: Ray / vLLM start-ups side by side
        self.lock = threading.Lock()
        self.done = threading.Condition(self.lock)

    def _finish(self, r: Result):
        with self.lock:
            self.results[r.check] = r
            self.done.notify_all()
        self.report(r)

    def _run_check(self, c: Check, seconds: int, slots: int):
        """Run a check's commands (``slots`` side by side) and judge them; whatever goes
        wrong here ends as a ``fail`` row, never as a missing one."""
        t0 = time.monotonic()
        try:
            status, detail = self._execute(c, seconds, slots, t0)
        except Exception as e:  # noqa: BLE001  (one broken check must not take the table down)
            status, detail = "fail", f"gpu_check error: {e!r}"
        self._finish(Result(c.name, status, time.monotonic() - t0, detail))

    def _execute(self, c: Check, seconds: int, slots: int, t0: float) -> tuple:
        for d in c.run_dirs:
            shutil.rmtree(d, ignore_errors=True)
        rcs: list = []
        for start in range(0, len(c.cmds), max(1, slots)):
            group = c.cmds[start:start + max(1, slots)]
            left = int(seconds - (time.monotonic() - t0))
            if left < 1:
                rcs += [124] * len(group)
                continue
            out: list = [None] * len(group)

            def one(i, cmd, left=left, out=out):
                out[i] = run_one(cmd.argv, self.logs / cmd.log, left, self.env, self.cwd)

            threads = [threading.Thread(target=one, args=(i, cmd)) for i, cmd in enumerate(group)]
            for i, t in enumerate(threads):
                if i:
                    time.sleep(self.stagger_s)
                t.start()
            for t in threads:
                t.join()
            rcs += [137 if rc is None else rc for rc in out]
        if all(rc == 0 for rc in rcs):
            return c.judge(c, rcs) if c.judge else ("pass", "")
        cmd, rc = next((cmd, rc) for cmd, rc in zip(c.cmds, rcs) if rc != 0)
        try:
            err = last_error_line((self.logs / cmd.log).read_text(errors="replace"))
        except OSError:
            err = ""
        what = f"timeout after {seconds} s" if rc in (124, 137) else f"exit {rc}"
        return "fail", f"{cmd.log}: {what}; {err}"

    def run(self):
        pending = list(self.plan)
        running: dict = {}
        while pending or running:
            with self.lock:
                for name in [n for n, (t, _) in running.items() if not t.is_alive()]:
                    running.pop(name)
                busy = sum(sl for _, sl in running.values())
                exclusive_running = any(c.exclusive for c in self.plan if c.name in running)
            started = False
            for c in list(pending):
                dep_results = [self.results.get(d) for d in c.after if d in {x.name for x in self.plan}]
                if any(r is None for r in dep_results):
                    if c.exclusive:
                        break  # keep the order around an exclusive check
                    continue
                failed = [r.check for r in dep_results if r.status != "pass"]
                if failed:
                    pending.remove(c)
                    self._finish(Result(c.name, "skip", 0.0, f"skip: needs {', '.join(failed)}"))
                    continue
                slots = max(1, min(len(c.cmds), self.jobs))
                if exclusive_running or (c.exclusive and busy) or busy + slots > self.jobs:
                    break
                seconds = self.budget.grant(c.want_s, c.need_s)
                if seconds is None:
                    pending.remove(c)
                    self._finish(Result(c.name, "skip", 0.0,
                                        f"skip: budget ({max(0, int(self.budget.remaining() - self.budget.reserve_s))}"
                                        f" s left, needs {c.need_s} s)"))
                    continue
                pending.remove(c)
                if started:
                    time.sleep(self.stagger_s)
                t = threading.Thread(target=self._run_check, args=(c, seconds, slots), daemon=True)
                with self.lock:
                    running[c.name] = (t, slots)
                t.start()
                busy += slots
                started = True
                if c.exclusive:
                    break
            if not started:
                with self.lock:
                    self.done.wait(timeout=1.0)
        return [self.results[c.name] for c in self.plan if c.name in self.results]


# ============================================================================ install
def registry_reachable(python: str, env: dict, seconds: int = 45) -> tuple:
    """Whether pip (with its own index / find-links settings) can fetch ``verl==0.9.1``."""
    with tempfile.TemporaryDirectory() as d:
        try:
            p = subprocess.run([python, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", "-q",
                                "--timeout", "5", "--retries", "0", "-d", d, "verl==0.9.1"], check=False, env=env, capture_output=True, text=True, timeout=seconds)
        except subprocess.TimeoutExpired:
            return False, f"pip download verl==0.9.1 timed out after {seconds} s"
        except OSError as e:
            return False, repr(e)[:120]
    return p.returncode == 0, ("" if p.returncode == 0 else last_error_line(p.stderr + p.stdout))


def install(e: dict, gpu: bool, env: dict, budget: Budget, logs: Path, no_install: bool) -> Result:
    """Install what the chosen interpreter lacks: the project itself without dependencies
    (offline: the ``verl.plugins`` entry point that patches every Ray worker) when only
    that is missing, else ``pip install -e .[gpu]`` (or ``.``) when pip reaches an index."""
    t0 = time.monotonic()
    python, have = e["python"], e.get("have") or {}
    core = ("torch", "verl", "trainer_deps") + (("vllm",) if gpu else ())
    lacking = [k for k in core if not have.get(k)]
    if no_install:
        return Result("install", "skip", 0.0, f"skip: --no-install (missing: {', '.join(lacking) or 'plugin'})")
    if lacking:
        ok, why = registry_reachable(python, env)
        if not ok:
            return Result("install", "skip", time.monotonic() - t0,
                          f"skip: missing {', '.join(lacking)}; no package index reachable ({why})")
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "-e", f"{ROOT}[gpu]" if gpu else str(ROOT)]
    else:
        argv = [python, "-m", "pip", "install", "--disable-pip-version-check", "--no-deps", "--no-build-isolation",
                "-e", str(ROOT)]
    seconds = budget.grant(420, 30)
    if seconds is None:
        return Result("install", "skip", 0.0, "skip: budget")
    rc = run_one(argv, logs / "install.log", seconds, env, ROOT)
    secs = time.monotonic() - t0
    if rc != 0:
        return Result("install", "fail", secs, f"{shlex.join(argv[2:])}: exit {rc}; "
                      + last_error_line((logs / "install.log").read_text(errors="replace")))
    return Result("install", "pass", secs, shlex.join(argv[1:]))


def make_bundle(root: Path = ROOT) -> Path:
    """Copy ../shared's data and Qwen2.5 tokenizer into artifacts/gpu_check/bundle/shared
    (ignored by git), for a GPU machine that receives only the checkout: carry it there."""
    src = find_shared(root)
    if src is None or src == bundle_dir(root).resolve():
        raise SystemExit("gpu_check: no shared folder (../shared) to bundle")
    dst = bundle_dir(root)
    shutil.rmtree(dst, ignore_errors=True)
    for part in ("data", "tokenizers/qwen2.5"):
        shutil.copytree(src / part, dst / part)
    size = sum(f.stat().st_size for f in dst.rglob("*") if f.is_file())
    print(f"gpu_check: bundled {src} -> {dst} ({size / 2**20:.1f} MiB); carry "
          f"{dst.parent.relative_to(root)} to the GPU machine")
    return dst


# ============================================================================ main
def parse_args(argv):
    p = argparse.ArgumentParser(prog="scripts/gpu_check.sh", description=__doc__.split("\n\n")[0])
    p.add_argument("--cpu", action="store_true", help="run the checks on the CPU (device=cpu, rollout hf)")
    p.add_argument("--dry-run", action="store_true", help="print the commands it would run, run none")
    p.add_argument("--list", action="store_true", help="list the checks and exit")
    p.add_argument("--only", help="comma-separated checks or patterns (recipe_*) to run")
    p.add_argument("--skip", help="comma-separated checks or patterns to leave out")
    p.add_argument("--budget", type=float, default=480, help="overall seconds (default 480 = 8 min)")
    p.add_argument("--jobs", type=int, default=None, help="runs side by side (default 4 on GPU, 1 on CPU)")
    p.add_argument("--out", help="report folder (default $OUT if set, else artifacts/gpu_check)")
    p.add_argument("--python", help="interpreter for the checks (default: the best of .venv, python3)")
    p.add_argument("--no-install", action="store_true", help="never pip install what is missing")
    p.add_argument("--ranks", type=int, default=None,
                   help="trainer.n_gpus_per_node of the recipe runs (default 2 when >= 2 GPUs, else 1)")
    p.add_argument("--seed", type=int, default=7, help="seed= of the same-seed runs")
    p.add_argument("--override", action="append", default=[], help="extra Hydra override for every run")
    p.add_argument("--same-seed-override", action="append", default=[],
                   help="extra override for the same-seed runs (e.g. actor_rollout_ref.rollout.full_determinism=true)")
    p.add_argument("--qwen-model", choices=("tiny_qwen", "tiny"), default=None,
                   help="model of eval / grpo_3steps / same_seed (default tiny_qwen on GPU, tiny on CPU)")
    p.add_argument("--min-corr", type=float, default=0.9,
                   help="least rollout/actor probability correlation per step that counts as weights in sync")
    p.add_argument("--kv-cache-bytes", type=int, default=1 << 30,
                   help="vLLM kv_cache_memory_bytes of the training runs (0: vLLM's profiling)")
    p.add_argument("--bundle", action="store_true",
                   help="copy ../shared's data and tokenizer into artifacts/gpu_check/bundle (to carry) and exit")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.bundle:
        make_bundle()
        return 0
    gpu = not args.cpu
    budget = Budget(args.budget)
    out = Path(args.out or os.environ.get("OUT") or ROOT / "artifacts" / "gpu_check").resolve()
    pack = bool(os.environ.get("OUT")) and out == Path(os.environ["OUT"]).resolve()
    logs = out / "logs"
    work = ROOT / "artifacts" / "gpu_check" / "work"
    recipes = sorted(p.stem for p in (ROOT / "conf" / "recipe").glob("*.yaml"))
    env = run_env()

    # ---- environment: probe the candidate interpreters, keep the best
    t0 = time.monotonic()
    gpus, gpu_name = count_gpus()
    probes = [probe(c, env) for c in candidates(args)]
    best = max(probes, key=lambda e: score_env(e, gpu)) if probes else {"python": None, "error": "no python found",
                                                                         "have": {}}
    results: list = []
    if not args.dry_run and not args.list:
        # a fresh report: runs, eval output and logs of an earlier invocation go
        for d in (work / "runs", work / "eval"):
            shutil.rmtree(d, ignore_errors=True)
        for f in logs.glob("*.log"):
            f.unlink()
        for d in (out, logs, work):
            d.mkdir(parents=True, exist_ok=True)

    def write_summary(final=False):
        if args.dry_run or args.list:
            return
        table = format_table(results)
        head = (f"# gpu_check ({'gpu' if gpu else 'cpu'} mode, {fmt(budget.elapsed(), 4)} s of {fmt(args.budget)} s"
                f"{'' if final else ', running'})\n\n")
        (out / "summary.md").write_text(head + table + "\n")
        (out / "summary.json").write_text(json.dumps({
            "mode": "gpu" if gpu else "cpu", "budget_s": args.budget, "elapsed_s": round(budget.elapsed(), 1),
            "final": final, "env": best, "gpus": gpus, "results": [asdict(r) for r in results],
            "counts": count_statuses(results)}, indent=2) + "\n")

    def report(r: Result):
        results.append(r)
        print(f"[gpu_check] {r.check}: {r.status} ({r.seconds:.0f} s) {clean_detail(r.detail, 160)}", flush=True)
        write_summary()

    have = dict(best.get("have") or {})
    need_env = ("cuda", "vllm", "verl", "trainer_deps", "recipe") if gpu else ("torch", "verl", "trainer_deps", "recipe")
    if not args.list:
        lacking = [k for k in need_env if not have.get(k)]
        detail = describe_env(best, gpus, gpu_name) + (f"; missing: {', '.join(lacking)}" if lacking else "")
        report(Result("env", "fail" if lacking else "pass", time.monotonic() - t0, detail))
        # ---- install what is missing: the project's plugin offline, the rest from an index
        # only when pip reaches one; not for vLLM on a machine without a GPU
        wants = lacking or not have.get("plugin")
        can = best.get("python") and not best.get("error") and (not gpu or gpus > 0 or have.get("cuda"))
        if wants and can:
            if args.dry_run:
                print("[gpu_check] would install: " + ("pip install -e .[gpu] (when an index is reachable)" if lacking
                                                       else "pip install --no-deps -e . (the verl.plugins entry point)"))
            else:
                r = install(best, gpu, env, budget, logs, args.no_install)
                report(r)
                if r.status == "pass":
                    best = probe(best["python"], env)
                    have = dict(best.get("have") or {})

    ranks = args.ranks or (2 if gpu and max(gpus, best.get("cuda_devices") or 0) >= 2 else 1)
    s = Settings(
        gpu=gpu, python=best.get("python") or "python3", work=work,
        artifacts=Path(env["RECIPE_ARTIFACTS"]).resolve(), hidden=256 if gpu else 64, ranks=ranks,
        qwen_model=args.qwen_model or ("tiny_qwen" if gpu else "tiny"), seed=args.seed,
        flash_attn=bool(have.get("flash_attn")), overrides=args.override, same_seed_overrides=args.same_seed_override,
        min_corr=args.min_corr, kv_cache_bytes=args.kv_cache_bytes if gpu else 0, recipes=recipes)
    plan = build_plan(s)
    try:
        chosen = select([c.name for c in plan], args.only, args.skip)
    except ValueError as e:
        print(f"gpu_check: {e}", file=sys.stderr)
        return 2
    if args.list:
        print("\n".join(c.name for c in plan))
        return 0
    # what the chosen checks need comes along (data, models)
    names = set(chosen)
    for c in plan:
        if c.name in names:
            names |= set(c.after)
    plan = [c for c in plan if c.name in names]

    if args.dry_run:
        print(f"# {'gpu' if gpu else 'cpu'} mode, python {s.python}, GPUs {gpus}, recipe ranks {ranks}, "
              f"jobs {args.jobs or (4 if gpu else 1)}, budget {args.budget:.0f} s, work {work}, logs {logs}")
        for c in plan:
            why = missing_for(c.needs, have)
            print(f"\n## {c.name}" + (f"  (would skip: missing {', '.join(why)})" if why else "")
                  + (" [alone]" if c.exclusive else ""))
            for cmd in c.cmds:
                print(shlex.join(timeout_argv(cmd.argv, c.want_s)) + f"  > {logs / cmd.log}")
            if not c.cmds:
                print("(nothing to run: already there)")
        print()
        print(format_table(results))
        return 0

    runnable = []
    for c in plan:
        why = missing_for(c.needs, have)
        if why:
            reason = {"cuda": "no CUDA GPU", "vllm": "vllm not installed", "verl": "verl not installed",
                      "trainer_deps": "trainer deps (ray, hydra, TransferQueue, ...) not installed",
                      "recipe": "project not importable", "torch": "torch not installed"}
            report(Result(c.name, "skip", 0.0, "skip: " + "; ".join(reason.get(w, w) for w in why)))
        else:
            runnable.append(c)
    jobs = max(1, args.jobs or (4 if gpu else 1))
    runner = Runner(runnable, budget, jobs, env, logs, work, report)
    runner.run()
    order = {c.name: i for i, c in enumerate(build_plan(s))}
    results.sort(key=lambda r: {"env": -2, "install": -1}.get(r.check, order.get(r.check, 99)))
    write_summary(final=True)
    if pack:
        pack_logs(out, logs, work)
    print()
    print(format_table(results))
    counts = count_statuses(results)
    print(f"\n{', '.join(f'{v} {k}' for k, v in counts.items())}; {budget.elapsed():.0f} s; report: {out}")
    return 1 if counts["fail"] else 0


def pack_logs(out: Path, logs: Path, work: Path):
    """Logs and every run's metrics.jsonl / config into one tarball (a device machine brings
    back at most 8 files from $OUT), then the loose logs go."""
    with tarfile.open(out / "gpu_check_logs.tar.gz", "w:gz") as tar:
        if logs.exists():
            tar.add(logs, arcname="logs")
        for f in sorted((work / "runs").glob("*/metrics.jsonl")) + sorted(work.glob("eval/results.*")):
            tar.add(f, arcname=str(f.relative_to(work)))
    shutil.rmtree(logs, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
