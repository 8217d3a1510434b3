"""All-or-nothing ``load_state_dict``: every key and every submodule's state is checked before anything is copied.

``torch.nn.Module.load_state_dict`` copies module by module and reports unexpected or missing keys
(and a child's refused state) only after its parents were loaded. Modules that define
``check_loaded_state(state_dict, prefix)`` (raising on a state they would refuse) are checked here
first, so a refused load leaves the whole module as it was.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn


def check_state(module: nn.Module, state_dict: Mapping[str, object], strict: bool) -> None:
    """Raise what ``module.load_state_dict(state_dict, strict)`` would raise, before it copies anything.

    A submodule may list in ``optional_state_keys`` the keys of its own it can do without (an
    older format); they are not reported missing.
    """
    for name, sub in module.named_modules():
        check = getattr(sub, "check_loaded_state", None)
        if check is not None:
            check(state_dict, name + "." if name else "")
    if not strict:
        return
    expected = module.state_dict(keep_vars=True).keys()
    unexpected = [key for key in state_dict if key not in expected]
    missing = [key for key in expected if key not in state_dict and not _optional(module, key)]
    if unexpected or missing:
        problems = [f"{kind} key(s) in state_dict: {', '.join(map(repr, keys))}."
                    for kind, keys in (("Unexpected", unexpected), ("Missing", missing)) if keys]
        raise RuntimeError(
            f"Error(s) in loading state_dict for {type(module).__name__}: {' '.join(problems)} "
            "The module was left unchanged."
        )


def _optional(module: nn.Module, key: str) -> bool:
    owner, _, name = key.rpartition(".")
    return name in getattr(module.get_submodule(owner), "optional_state_keys", ())


class CheckedLoad(nn.Module):
    """Mixin: ``load_state_dict`` checks the whole state (:func:`check_state`) before loading any of it."""

    def load_state_dict(self, state_dict: Mapping[str, object], strict: bool = True, assign: bool = False):
        check_state(self, state_dict, strict)
        return super().load_state_dict(state_dict, strict=strict, assign=assign)
