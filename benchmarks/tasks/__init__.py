"""Synthetic tasks that a tiny model can learn on CPU in minutes (benchmarks, tests).

* :mod:`benchmarks.tasks.arithmetic`: integer arithmetic problems (``What is 37+58?``) as
  verl-format parquet files whose ground truth :mod:`recipe.reward.math_reward` grades
  unchanged.
"""
