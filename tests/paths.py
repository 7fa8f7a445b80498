"""Where the tests find the shared data and tokenizers: ``$RECIPE_SHARED_DIR`` or the
``shared/`` folder beside the checkout (what CI provides). Missing files fail the tests
loudly instead of skipping them."""

from __future__ import annotations

from pathlib import Path

from recipe.models import shared_dir

SHARED = shared_dir()
DATA = SHARED / "data"
GSM8K_TRAIN = DATA / "gsm8k" / "train.jsonl"
MATH500 = DATA / "math500" / "test.jsonl"
QWEN_TOK = SHARED / "tokenizers" / "qwen2.5"


def require(*paths: Path) -> None:
    """Raise ``FileNotFoundError`` naming the first missing path (tests need the real data)."""
    for p in paths:
        if not p.exists():
            raise FileNotFoundError(f"{p} not found: the tests read ../shared beside the checkout "
                                    "(or set RECIPE_SHARED_DIR)")
