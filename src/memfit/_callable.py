"""Packages that are also functions: ``memfit.plan(...)`` and ``memfit.weights(...)``.

memfit's two verbs are named after their packages: ``memfit.plan(model, batch,
budget)`` plans while ``memfit.plan.estimate`` stays importable, and
``memfit.weights(model, bits="nf4")`` compresses while ``memfit.weights.CompressedWeights``
does. :func:`make_callable` gives such a package's module object a class whose
``__call__`` is the function; nothing else about the module changes.
"""

from __future__ import annotations

import sys
import types
from typing import Any, Callable


class CallablePackage(types.ModuleType):
    """A package module that can be called: ``__call__`` forwards to ``__call_target__``."""

    __call_target__: Callable[..., Any]

    def __call__(self, *args, **kwargs):
        return self.__call_target__(*args, **kwargs)


def make_callable(module_name: str, target: Callable[..., Any]) -> None:
    """Make the (already imported) module ``module_name`` callable as ``target``."""
    module = sys.modules[module_name]
    module.__class__ = CallablePackage
    module.__call_target__ = target
