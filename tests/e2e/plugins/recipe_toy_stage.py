"""A toy stage kept outside the package: what a user adds to hook into verl's step.

It is loaded with ``stages.extra=[recipe_toy_stage]`` (this folder on ``PYTHONPATH``, as a
user's own module would be) and enabled with ``+toy_metric.enable=true``; nothing in
``recipe/`` names it. It counts the rows verl
sampled and the log-prob passes it saw, and logs them as ``toy/*`` metrics.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from recipe.config import ConfigError, ConfigNode, rule
from recipe.stages.base import Handles, SampleContext, Stage, register_stage
from recipe.stages.rows import real_indices


@dataclass
class ToyMetricConfig(ConfigNode):
    """``toy_metric``: enable, and a constant logged as ``toy/constant``."""

    PREFIX: ClassVar[str] = "toy_metric"

    enable: bool = field(default=False, metadata=rule("bool"))
    constant: float = field(default=1.5, metadata=rule("real"))


@register_stage
class ToyMetricStage(Stage):
    """Logs ``toy/step``, ``toy/sampled_rows``, ``toy/old_log_prob_calls`` and ``toy/constant``."""

    name = "toy_metric"
    config_cls = ToyMetricConfig
    order = 80

    def __init__(self, cfg, config):
        super().__init__(cfg, config)
        self.sampled_rows = 0
        self.old_log_prob_calls = 0

    @classmethod
    def check_config(cls, config) -> None:
        if config.actor_rollout_ref.rollout.n < 2:
            raise ConfigError("toy_metric needs actor_rollout_ref.rollout.n >= 2")

    def sample(self, ctx: SampleContext, batch, metrics: dict):
        self.sampled_rows = len(real_indices(batch.tags))
        return batch

    def after_old_log_prob(self, h: Handles, batch, metrics: dict) -> None:
        self.old_log_prob_calls += 1

    def metrics(self, h: Handles, batch, metrics: dict) -> None:
        metrics.update({"toy/step": h.step, "toy/sampled_rows": self.sampled_rows,
                        "toy/old_log_prob_calls": self.old_log_prob_calls, "toy/constant": self.cfg.constant})

    def state_dict(self) -> dict:
        return {"old_log_prob_calls": self.old_log_prob_calls}

    def load_state_dict(self, state: dict) -> None:
        self.old_log_prob_calls = int(state.get("old_log_prob_calls", 0))
