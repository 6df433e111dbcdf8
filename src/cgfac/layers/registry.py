"""Which helper covers which module type: a registry keyed by type, the most-derived match wins.

A *helper factory* is ``factory(name, module)`` returning a :class:`~cgfac.layers.base.LayerHelper`
(one block), a :class:`~cgfac.layers.base.LayerGroup` (several blocks), or a reason string when
this module is not covered (it then keeps its plain gradient and the reason is reported).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from torch import nn

from cgfac.layers.base import LayerGroup, LayerHelper, trainable

Helper = LayerHelper | LayerGroup
HelperFactory = Callable[[str, nn.Module], "Helper | str | None"]

_REGISTRY: dict[type, HelperFactory] = {}


def _check(module_type: type, factory: HelperFactory) -> None:
    if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
        raise TypeError(f"module_type must be a subclass of torch.nn.Module, got {module_type!r}")
    if not callable(factory):
        raise TypeError(f"helper factory for {module_type.__name__} must be callable, got {factory!r}")


def register_layer_helper(module_type: type, helper_factory: HelperFactory) -> None:
    """Cover ``module_type`` (and its subclasses without a registration of their own) by
    ``helper_factory(name, module) -> LayerHelper | LayerGroup | str``. Replaces any previous
    registration of that exact type."""
    _check(module_type, helper_factory)
    _REGISTRY[module_type] = helper_factory


def registered_helpers() -> dict[type, HelperFactory]:
    """A copy of the global registry."""
    return dict(_REGISTRY)


def check_overrides(overrides: Mapping[type, HelperFactory] | None) -> dict[type, HelperFactory]:
    if overrides is None:
        return {}
    if not isinstance(overrides, Mapping):
        raise TypeError(f"layer_helpers must be a mapping from module type to factory, got {type(overrides).__name__}")
    for module_type, factory in overrides.items():
        _check(module_type, factory)
    return dict(overrides)


def _find(module_type: type, overrides: Mapping[type, HelperFactory] | None) -> tuple[HelperFactory, str] | None:
    overrides = overrides or {}
    for cls in module_type.__mro__:
        if cls in overrides:
            return overrides[cls], f"layer_helpers[{cls.__name__}]"
        if cls in _REGISTRY:
            return _REGISTRY[cls], f"registered:{cls.__name__}"
    return None


def find_factory(module_type: type, overrides: Mapping[type, HelperFactory] | None = None) -> HelperFactory | None:
    """The factory of the most-derived registered class of ``module_type`` (its MRO order); at
    one class, a per-preconditioner override wins over the global registry."""
    found = _find(module_type, overrides)
    return None if found is None else found[0]


def make_helper(name: str, module: nn.Module, overrides: Mapping[type, HelperFactory] | None = None, *,
                probe: bool = True) -> Helper | str | None:
    """The helper for a covered module, a reason string for an uncovered one, None if untrainable.

    A module counts only for its own (non-recursive) parameters. A frozen weight leaves the
    layer alone; a frozen bias is left out of the layer matrix. A type without a registered
    factory is probed (``probe=True``, :mod:`cgfac.layers.probe`: ``F.linear``, HF ``Conv1D``'s
    ``x @ weight + b``, ``F.embedding``, RMSNorm/LayerNorm-like). The helper's ``rule`` says which
    rule covered the module: ``registered:<class>``, ``layer_helpers[<class>]`` or ``probe:<kind>``.
    """
    if not trainable(module):
        return None
    found = _find(type(module), overrides)
    if found is None:
        if not probe:
            return f"{type(module).__name__} is not a covered layer type"
        from cgfac.layers.probe import probe_helper

        return probe_helper(name, module)
    factory, rule = found
    helper = factory(name, module)
    if isinstance(helper, (LayerHelper, LayerGroup)) and not helper.rule:
        helper.rule = rule
    return helper
