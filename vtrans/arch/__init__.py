"""Architecture adapters behind a registry.

``vtrans.arch.register(adapter)`` adds one; ``vtrans.arch.registered()`` lists their names; ``for_model(model)``
finds the adapter of a Hugging Face model (dense, or compressed by vtrans).
"""

from __future__ import annotations

import importlib
import pkgutil

from transformers import PretrainedConfig, PreTrainedModel

from vtrans.arch.base import Adapter, HookPoints, Layout, Slot
from vtrans.errors import UnsupportedModelError

_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter | type[Adapter]) -> Adapter:
    """Register an adapter (class or instance) for the ``model_type`` values it lists. Usable as a decorator."""
    inst = adapter() if isinstance(adapter, type) else adapter
    if not inst.name or not inst.model_types:
        raise ValueError(f"adapter {type(inst).__name__} needs a name and model_types")
    _REGISTRY[inst.name] = inst
    return adapter  # type: ignore[return-value]


def registered() -> list[str]:
    """Names of the registered adapters."""
    return sorted(_REGISTRY)


def supported_model_types() -> list[str]:
    return sorted(t for a in _REGISTRY.values() for t in a.model_types)


def get(name: str) -> Adapter:
    if name not in _REGISTRY:
        raise UnsupportedModelError(f"no adapter named {name!r}; registered: {registered()}")
    return _REGISTRY[name]


def for_config(config: PretrainedConfig) -> Adapter:
    """The adapter of a config's ``model_type`` (``vtrans_<name>`` for compressed models)."""
    model_type = getattr(config, "model_type", None)
    for a in _REGISTRY.values():
        if model_type in a.model_types or model_type == f"vtrans_{a.name}":
            return a
    raise UnsupportedModelError(
        f"model_type {model_type!r} is not supported; supported: {supported_model_types()}. "
        "Register an adapter with vtrans.arch.register(...)"
    )


def for_model(model: PreTrainedModel) -> Adapter:
    """The adapter of a model; raises :class:`UnsupportedModelError` for unsupported architectures or head classes."""
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"model must be a transformers PreTrainedModel, got {type(model).__name__}")
    adapter = for_config(model.config)
    adapter.check(model)
    return adapter


# every module of this package registers its adapters: a new family is one new file here
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    importlib.import_module(f"{__name__}.{_module}")

__all__ = ["Adapter", "HookPoints", "Layout", "Slot", "for_config", "for_model", "get", "register", "registered",
           "supported_model_types"]
