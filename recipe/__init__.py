"""Sample-efficient RL recipes for LLM math reasoning, as a plugin for verl 0.9.1.

Sub-modules: ``recipe.data`` (dataset preparation), ``recipe.models`` (tiny local
models and tokenizers), ``recipe.reward`` (safe math rewards), ``recipe.trainer``
(verl trainer hooks).
"""

__version__ = "0.1.0"
