"""Evaluation and training metrics; pure Python / numpy, no verl.

- :func:`pass_at_k`: unbiased pass@k of one problem (Chen et al. 2021, "Evaluating Large
  Language Models Trained on Code", eq. 1); :func:`avg_at_k`: mean accuracy over k samples.
- :func:`benchmark_metrics` (``python -m recipe.eval``) and :func:`validation_metrics`
  (training validation, ``val/`` prefix): avg@k and pass@j per source plus their
  unweighted mean (``average``).
- :func:`effective_ratio`: share of groups with 0 < accuracy < 1 (the DOTS paper's
  "effective" questions, the ones with a GRPO gradient).
- :func:`reward_metrics`: batch means of the reward function's numeric fields.
"""

from __future__ import annotations

import math
import numbers
from collections import defaultdict
from collections.abc import Hashable, Iterable, Mapping, Sequence
from typing import Any

import numpy as np

from recipe.algos.group_filter import group_accuracy
from recipe.config import ConfigError

#: Name of the averaged pseudo-benchmark in metric keys (``average/avg@16``).
AVERAGE = "average"


def _count(value: Any, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return int(value)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k estimate for one problem from n samples of which c are correct.

    Chen et al. 2021, "Evaluating Large Language Models Trained on Code" (arXiv
    2107.03374), Eq. 1: pass@k = 1 - C(n - c, k) / C(n, k), the probability that at least
    one of k samples drawn without replacement from the n is correct. Computed as their
    numerically stable product, 1 - prod_{i = n-c+1}^{n} (1 - k / i), which avoids huge
    binomials. pass@1 = c / n.

    Args:
        n: Samples drawn (>= 1).
        c: Correct samples among them (0 <= c <= n).
        k: Budget (1 <= k <= n).

    Returns:
        The estimate in [0, 1] (float): 0 when c = 0, 1 when n - c < k.

    Raises:
        ValueError: A count is not an integer or out of range (names it).
    """
    n, c, k = _count(n, "n"), _count(c, "c"), _count(k, "k")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if not 0 <= c <= n:
        raise ValueError(f"c must be in [0, n={n}], got {c}")
    if not 1 <= k <= n:
        raise ValueError(f"k must be in [1, n={n}], got {k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def avg_at_k(accs: Sequence[Sequence[float]]) -> float:
    """avg@k: mean accuracy of k samples per problem, averaged over problems.

    Minimalist paper (Xiong et al., arXiv 2504.11343), Table 1: avg@16 at T = 1.0.

    Args:
        accs: ``[P][k]`` per-sample accuracies in [0, 1] (one inner sequence per problem;
            every problem has at least one sample).

    Returns:
        mean_p (mean_s accs[p][s]) (float).

    Raises:
        ValueError: No problem, a problem without samples, or an accuracy outside [0, 1].
    """
    if len(accs) == 0:
        raise ValueError("avg_at_k: no problems")
    means = []
    for p, row in enumerate(accs):
        if len(row) == 0:
            raise ValueError(f"avg_at_k: problem {p} has no samples")
        arr = np.asarray(row, dtype=np.float64)
        if not np.all((arr >= 0.0) & (arr <= 1.0)):
            raise ValueError(f"avg_at_k: problem {p} has an accuracy outside [0, 1]: {list(row)}")
        means.append(arr.mean())
    return float(np.mean(means))


def check_pass_ks(pass_ks: Iterable[Any], k: int, key: str = "pass_k") -> list[int]:
    """Checks the pass@j budgets against the samples per problem.

    Args:
        pass_ks: The budgets j.
        k: Samples per problem.
        key: Config key named in the error.

    Returns:
        The budgets as ints, duplicates removed, in order.

    Raises:
        ConfigError: An entry is not an integer in [1, k] (names ``key`` and ``k``).
    """
    out: list[int] = []
    for j in pass_ks:
        if isinstance(j, bool) or not isinstance(j, numbers.Integral):
            raise ConfigError(f"{key}: {j!r} is not an integer")
        if not 1 <= int(j) <= k:
            raise ConfigError(
                f"{key}={list(pass_ks)}: pass@{j} needs 1 <= {j} <= k = {k} samples per problem; "
                f"raise k or drop {j}"
            )
        if int(j) not in out:
            out.append(int(j))
    return out


def _group_metrics(
    groups: Mapping[str, Mapping[Hashable, list[float]]], pass_ks: Sequence[int], prefix: str
) -> dict[str, float]:
    """Per-source avg@n / pass@j over problems, plus their unweighted mean over sources."""
    metrics: dict[str, float] = {}
    per_source: dict[str, dict[str, float]] = {}
    sizes = set()
    for source in sorted(groups):
        problems = groups[source]
        counts = {len(v) for v in problems.values()}
        if len(counts) != 1:
            raise ValueError(
                f"{source}: problems have different numbers of samples {sorted(counts)}; "
                "avg@k / pass@k need the same k for every problem"
            )
        n = counts.pop()
        sizes.add(n)
        rows = list(problems.values())
        for uid, accs in problems.items():
            for a in accs:
                if a not in (0.0, 1.0):
                    raise ValueError(f"{source}: problem {uid!r} has accuracy {a!r}; pass@k needs 0 or 1")
        for j in pass_ks:
            if not 1 <= j <= n:
                raise ValueError(f"{source}: pass@{j} needs 1 <= {j} <= n = {n} samples per problem")
        values = {f"avg@{n}": avg_at_k(rows)}
        for j in pass_ks:
            values[f"pass@{j}"] = float(np.mean([pass_at_k(n, int(sum(r)), j) for r in rows]))
        per_source[source] = values
        metrics.update({f"{prefix}{source}/{name}": v for name, v in values.items()})
    if len(sizes) > 1:
        raise ValueError(f"sources have different samples per problem {sorted(sizes)}; cannot average them")
    if per_source:
        names = next(iter(per_source.values())).keys()
        for name in names:
            metrics[f"{prefix}{AVERAGE}/{name}"] = float(np.mean([v[name] for v in per_source.values()]))
    return metrics


def _as_acc(value: Any, where: str) -> float:
    try:
        a = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{where}: accuracy {value!r} is not a number") from None
    if math.isnan(a) or not 0.0 <= a <= 1.0:
        raise ValueError(f"{where}: accuracy {value!r} is outside [0, 1]")
    return a


def benchmark_metrics(records: Iterable[Mapping[str, Any]], pass_ks: Sequence[int] = (1,)) -> dict[str, float]:
    """Evaluation metrics from per-sample records.

    Args:
        records: One mapping per sample (``B`` = problems x k) with ``benchmark`` (str),
            ``index`` (the problem, hashable) and ``acc`` (0 or 1).
        pass_ks: Budgets j of pass@j (each <= the samples per problem).

    Returns:
        ``{"<bench>/avg@<k>", "<bench>/pass@<j>", ..., "average/avg@<k>",
        "average/pass@<j>"}`` (floats in [0, 1]); ``average`` is the unweighted mean over
        benchmarks. Empty when there are no records.

    Raises:
        ValueError: A record lacks a key or has an accuracy other than 0 / 1, problems of a
            benchmark (or benchmarks) have different sample counts, or some j exceeds k.
    """
    groups: dict[str, dict[Hashable, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, r in enumerate(records):
        try:
            bench, index, acc = r["benchmark"], r["index"], r["acc"]
        except KeyError as e:
            raise ValueError(f"record {i}: missing key {e.args[0]!r} (needs benchmark, index, acc)") from None
        groups[str(bench)][index].append(_as_acc(acc, f"record {i} ({bench}, problem {index})"))
    return _group_metrics(groups, [int(j) for j in pass_ks], prefix="")


def validation_metrics(
    data_sources: Sequence[str],
    uids: Sequence[Hashable],
    accs: Sequence[float],
    pass_ks: Sequence[int] = (1,),
) -> dict[str, float]:
    """Training-time validation metrics with the evaluation's names under ``val/``.

    Args:
        data_sources: ``[B]`` data source of each validation response (B = prompts x n).
        uids: ``[B]`` prompt id of each response (responses of one prompt share it).
        accs: ``[B]`` correctness of each response, 0 or 1 (the reward's ``acc``).
        pass_ks: Budgets j of pass@j (each <= n).

    Returns:
        ``{f"val/{source}/avg@{n}", f"val/{source}/pass@{j}", ..., f"val/average/avg@{n}",
        f"val/average/pass@{j}"}`` with n = responses per prompt (floats in [0, 1]);
        ``val/average`` is the unweighted mean over sources. Empty for an empty batch.

    Raises:
        ValueError: Lengths differ, an accuracy is not 0 / 1, prompts have different
            numbers of responses, or some j exceeds n.
    """
    if not len(data_sources) == len(uids) == len(accs):
        raise ValueError(
            f"data_sources, uids and accs must have the same length, got {len(data_sources)}, {len(uids)}, {len(accs)}"
        )
    groups: dict[str, dict[Hashable, list[float]]] = defaultdict(lambda: defaultdict(list))
    for i, (source, uid, acc) in enumerate(zip(data_sources, uids, accs)):
        groups[str(source)][uid].append(_as_acc(acc, f"response {i} ({source}, uid {uid})"))
    return _group_metrics(groups, [int(j) for j in pass_ks], prefix="val/")


def effective_ratio(uids: Sequence[str], accs: Sequence[float]) -> float | None:
    """Share of the groups (one ``uid`` each) whose mean accuracy lies strictly in (0, 1).

    Args:
        uids: ``[B]`` group id of each response (B = prompts x n).
        accs: ``[B]`` correctness of each response in [0, 1].

    Returns:
        The share in [0, 1] (DOTS + RR paper's effective ratio), or None for no responses.

    Raises:
        ValueError: lengths differ or an accuracy lies outside [0, 1].
    """
    if len(uids) != len(accs):
        raise ValueError(f"effective_ratio: {len(uids)} uids but {len(accs)} accuracies")
    if len(uids) == 0:
        return None
    acc = group_accuracy(list(uids), list(accs))
    return float(np.mean([0.0 < a < 1.0 for a in acc.values()]))


def reward_metrics(infos: Iterable[Mapping[str, Any]], prefix: str = "reward/") -> dict[str, float]:
    """Average the numeric entries of per-response reward dicts.

    Args:
        infos: One ``reward_extra_info`` dict per response (``B`` = prompts x n).
        prefix: Metric name prefix.

    Returns:
        ``{prefix + key: mean}`` over the responses that carry ``key`` with a number or bool
        value (strings such as the extracted answer are skipped). ``score`` is skipped:
        verl reports it as ``critic/score/mean``.
    """
    values: dict[str, list[float]] = defaultdict(list)
    for info in infos:
        for key, value in info.items():
            if key == "score" or isinstance(value, str):
                continue
            if isinstance(value, (bool, np.bool_, numbers.Number)):
                values[key].append(float(value))
    return {f"{prefix}{k}": float(np.mean(v)) for k, v in values.items() if v}
