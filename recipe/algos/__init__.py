"""Algorithms of the Minimalist paper (arXiv 2504.11343) as verl plug-ins.

Importing this package registers, with verl 0.9.1's registries:

* advantage estimators (``algorithm.adv_estimator``): ``reinforce``, ``reinforce_rej``,
  ``raft``, ``raft_pp`` (``recipe.algos.advantages``);
* policy losses (``actor_rollout_ref.actor.policy_loss.loss_mode``): ``raft``, ``raft_pp``
  (``recipe.algos.losses``).

Preference optimisation (iterative DPO, LoRR; ``recipe.algos.preference``): the losses
``dpo``, ``ipo``, ``simpo`` (its own registry, ``PREFERENCE_LOSSES``: they need pairs, which
verl's policy-loss signature cannot carry), pair building and the LoRR reset / SFT pieces.

Group filters (Reinforce-Rej, DAPO-style refill) are pure decisions in
``recipe.algos.filters``. Importing twice is harmless.
"""

from recipe.algos import advantages, filters, losses, preference

__all__ = ["advantages", "filters", "losses", "preference"]
