"""Algorithms of the Minimalist paper (arXiv 2504.11343) as verl plug-ins.

Importing this package registers, with verl 0.9.1's registries:

* advantage estimators (``algorithm.adv_estimator``): ``reinforce``, ``reinforce_rej``,
  ``raft``, ``raft_pp`` (``recipe.algos.advantages``);
* policy losses (``actor_rollout_ref.actor.policy_loss.loss_mode``): ``raft``, ``raft_pp``
  (``recipe.algos.losses``).

Group filters (Reinforce-Rej, DAPO-style refill) are pure decisions in
``recipe.algos.filters``. Importing twice is harmless.
"""

from recipe.algos import advantages, filters, losses

__all__ = ["advantages", "filters", "losses"]
