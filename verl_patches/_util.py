"""Helpers shared by the patch modules: idempotent rebinding of a module attribute."""

from __future__ import annotations

import sys
from typing import Any, Callable


class PatchError(RuntimeError):
    """A patch could not be applied to the installed verl (wrong version or layout)."""


def rebind(module_name: str, attr: str, make_new: Callable[[Any], Any]) -> Any:
    """Replace ``module.attr`` with ``make_new(original)``, once.

    Every already-imported verl module that bound the original object by name
    (``from module import attr``) is rebound too (other packages are left alone), so the patch holds whatever the
    import order was. A second call is a no-op (the replacement carries
    ``__verl_patches__ = True``).

    Args:
        module_name: Dotted module name, imported if needed.
        attr: Attribute to replace.
        make_new: Called with the original object; returns the replacement.

    Returns:
        The replacement now bound at ``module.attr``.

    Raises:
        PatchError: when the module or attribute does not exist.
    """
    import importlib

    try:
        module = importlib.import_module(module_name)
    except ImportError as e:  # pragma: no cover - verl layout changed
        raise PatchError(f"cannot import {module_name}: {e}") from e
    if not hasattr(module, attr):
        raise PatchError(f"{module_name}.{attr} does not exist in this verl; the patch cannot apply")
    original = getattr(module, attr)
    if getattr(original, "__verl_patches__", False):
        return original
    new = make_new(original)
    try:
        new.__verl_patches__ = True
        new.__wrapped_original__ = original
    except (AttributeError, TypeError):  # pragma: no cover - builtins
        pass
    for name, mod in list(sys.modules.items()):
        if name.split(".")[0] == "verl" and mod is not None and getattr(mod, attr, None) is original:
            setattr(mod, attr, new)
    setattr(module, attr, new)
    return new
