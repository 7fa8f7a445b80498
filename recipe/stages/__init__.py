"""verl integration stages: each capability of this project as one :class:`~recipe.stages.base.Stage`
that hooks into verl's V1 training step, named like its algorithm module.

- :mod:`~recipe.stages.base`: the Stage protocol, :class:`~recipe.stages.base.Handles`, the registry.
- :mod:`~recipe.stages.rows`: TransferQueue row helpers (uid from key, padding, tags, reward fields).
- :mod:`~recipe.stages.group_filter`: the sampler every recipe uses (group filter, then the
  stages' ``sample`` hooks); algorithm :mod:`recipe.algos.group_filter`.
- :mod:`~recipe.stages.rollout_replay`: rollout replay; :mod:`recipe.algos.rollout_replay`.
- :mod:`~recipe.stages.dots`: DOTS reference rounds and selection; :mod:`recipe.algos.dots`.
- :mod:`~recipe.stages.preference`: iterative DPO / LoRR; :mod:`recipe.algos.preference`,
  :mod:`recipe.algos.lorr`.
- :mod:`~recipe.stages.reward_metrics`: ``reward/*`` and ``dots/effective_ratio``; :mod:`recipe.algos.metrics`.
- :mod:`~recipe.stages.workers`: verl's actor worker plus the preference / LoRR methods.
- :mod:`~recipe.stages.trainer`: verl's sync V1 trainer running the enabled stages.

Stage modules import algorithms, :mod:`recipe.config`, :mod:`recipe.io` and
:mod:`recipe.stages.rows` / :mod:`recipe.stages.base` only, never the trainer or a tool.
"""
