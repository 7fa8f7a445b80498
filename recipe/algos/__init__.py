"""Algorithms of the Minimalist paper (arXiv 2504.11343) as verl plug-ins.

Importing this package registers, with verl 0.9.1's registries:

* advantage estimators (``algorithm.adv_estimator``): ``reinforce``, ``reinforce_rej``,
  ``raft``, ``raft_pp`` (``recipe.algos.advantages``);
* policy losses (``actor_rollout_ref.actor.policy_loss.loss_mode``): ``raft``, ``raft_pp``
  (``recipe.algos.losses``).

Preference optimisation (iterative DPO, LoRR; ``recipe.algos.preference``): the losses
``dpo``, ``ipo``, ``simpo`` (its own registry, ``PREFERENCE_LOSSES``: they need pairs, which
verl's policy-loss signature cannot carry), pair building and the LoRR reset / SFT pieces.

Pure parts of the other methods, one concept per module: ``group_filter`` (Reinforce-Rej,
DAPO-style refill decisions), ``rollout_replay`` (buffer, off-policy weights), ``dots``
(difficulty prediction, selection, adapter), ``lorr`` (reset arithmetic, lambda_k, reuse
draw), ``metrics`` (avg@k, pass@k, effective ratio). Importing twice is harmless.
"""

from recipe.algos import advantages, group_filter, losses, preference

__all__ = ["advantages", "group_filter", "losses", "preference"]
