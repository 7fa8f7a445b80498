"""A test-only reward: "correct" iff the response has an odd number of characters.

A random tiny model never writes a correct math answer, so every group would be all-wrong
and group filters would drop everything. This reward gives mixed groups instead, which
exercises the filters' keep path and the advantage/loss code end to end. It returns the
same keys as the real reward (``recipe.reward.math_reward``).
"""


def compute_score(data_source, solution_str, ground_truth, extra_info=None, correct_reward=1.0,
                  incorrect_reward=0.0, **kwargs):
    acc = float(len(solution_str) % 2 == 1)
    return {
        "score": correct_reward if acc else incorrect_reward,
        "acc": acc,
        "has_answer": 1.0,
        "grader_timeout": 0.0,
        "grader_error": 0.0,
        "grader_rejected": 0.0,
    }
