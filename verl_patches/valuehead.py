"""PPO critic on CPU: load the value-head model with SDPA attention.

verl 0.9.1's ``verl.utils.model.load_valuehead_model`` (used by the FSDP critic) passes
``attn_implementation="flash_attention_2"`` unconditionally, which fails without the
flash-attn package and a GPU ("FlashAttention2 has been toggled on"), whatever
``critic.model.override_config.attn_implementation`` says. On CPU the replacement loads
the same ``AutoModelForTokenClassification`` (a ``num_labels=1`` score head, as verl does)
with ``attn_implementation="sdpa"``; if that fails it defers to verl's function (whose TRL
fallback then applies).
"""

from __future__ import annotations

import functools

from ._util import rebind


def _sdpa_on_cpu(original):
    @functools.wraps(original)
    def load_valuehead_model(local_path, torch_dtype, model_config, trust_remote_code):
        from transformers import AutoModelForTokenClassification

        from verl.utils.device import get_device_name

        if get_device_name() != "cpu":
            return original(local_path, torch_dtype, model_config, trust_remote_code)
        try:
            return AutoModelForTokenClassification.from_pretrained(
                pretrained_model_name_or_path=local_path,
                dtype=torch_dtype,
                config=model_config,
                attn_implementation="sdpa",
                trust_remote_code=trust_remote_code,
            )
        except Exception:  # noqa: BLE001 - verl's own path reports what is wrong
            return original(local_path, torch_dtype, model_config, trust_remote_code)

    return load_valuehead_model


def apply() -> None:
    """Load critic value heads with SDPA on CPU (idempotent)."""
    rebind("verl.utils.model", "load_valuehead_model", _sdpa_on_cpu)
