"""Swap ``nn.Linear`` modules of a model for adapter wrappers and back (no monkeypatched ``forward``)."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from lora_moe_core.errors import UserError


def _parent(root: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (root.get_submodule(parent_name) if parent_name else root), child


def wrap_linears(root: nn.Module, names: list[str], factory: Callable[[str, nn.Linear], nn.Module]) -> None:
    """Replace each named ``nn.Linear`` under ``root`` with ``factory(name, linear)``.

    Raises:
        UserError: when a name is missing or not a plain linear (already wrapped, or another model).
    """
    for name in names:
        try:
            module = root.get_submodule(name)
        except AttributeError:
            raise UserError(f"adapter target '{name}' does not exist in this model") from None
        if not isinstance(module, nn.Linear):  # a plain or an fp8-stored (memory.FP8Linear) frozen linear
            raise UserError(f"adapter target '{name}' is a {type(module).__name__}, not an nn.Linear")
        parent, child = _parent(root, name)
        setattr(parent, child, factory(name, module))


def unwrap_linears(root: nn.Module, wrapper_types: tuple[type, ...]) -> int:
    """Put every wrapper's ``base_layer`` back in its place; returns how many were removed.

    Innermost first: a wrapper around the base layer of another (a LoRA over a frozen one) is named
    ``<outer>.base_layer``, a name that only means that wrapper while the outer one is still in place.
    """
    wrapped = [name for name, module in root.named_modules() if isinstance(module, wrapper_types)]
    for name in reversed(wrapped):  # named_modules lists a parent before its children
        parent, child = _parent(root, name)
        wrapper = getattr(parent, child)
        if getattr(wrapper, "merged", False):
            wrapper.unmerge()
        setattr(parent, child, wrapper.base_layer)
    return len(wrapped)
