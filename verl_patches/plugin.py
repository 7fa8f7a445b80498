"""Entry-point module: importing it applies the patches.

verl's plugin loader calls ``entry_point.load()``, which only imports the named object,
so the work happens at import time here (see :func:`verl_patches.load`).
"""

from verl_patches import load

load()
