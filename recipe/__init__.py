"""Sample-efficient RL recipes for LLM math reasoning, as a plugin for verl 0.9.1.

Layers (dependencies point one way: tools -> stages -> algorithms; config and io for all):

- ``recipe.algos``: pure torch / numpy: advantage estimators, policy losses, group filters,
  replay buffer, DOTS prediction and selection, preference losses and pairs, LoRR resets
  and schedules, metrics (avg@k, pass@k, effective ratio).
- ``recipe.stages``: verl integration, one stage per capability behind a small protocol,
  the worker extension and the trainer (``recipe.stages.trainer.RecipeTrainer``).
- ``recipe.reward``: the math reward for verl, the safe grading pool, the one answer extractor.
- ``recipe.config`` (errors, paths, validated config nodes, start-up checks) and
  ``recipe.io`` (atomic writes).
- Tools, each ``python -m recipe.<tool>``: ``main`` (training, what ``./run.sh`` runs),
  ``data``, ``models``, ``eval``, ``report``, ``dots``; ``slurm`` is the sweep glue ``main``
  uses.
"""

__version__ = "0.1.0"
