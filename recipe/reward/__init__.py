"""Safe math rewards for verl: answer extraction, a sandboxed math-verify grading pool and the
``compute_score`` reward function.

Use in a verl config::

    reward:
      custom_reward_function:
        path: pkg://recipe.reward.math_reward
        name: compute_score          # or compute_score_async
        reward_kwargs: {correct_reward: 1.0, incorrect_reward: 0.0}
"""

from recipe.reward.grader import (
    STATUSES,
    GradeResult,
    GraderConfig,
    SafeGrader,
    check_caps,
    close_all_graders,
    extract_answer,
    get_grader,
    gsm8k_answer,
    last_boxed,
)

__all__ = [
    "STATUSES",
    "GradeResult",
    "GraderConfig",
    "SafeGrader",
    "check_caps",
    "close_all_graders",
    "extract_answer",
    "get_grader",
    "gsm8k_answer",
    "last_boxed",
]
