"""Packages that are also functions: ``memfit.plan(...)`` and ``memfit.weights(...)``.

memfit's two verbs are named after their packages: ``memfit.plan(model, batch,
budget)`` plans while ``memfit.plan.estimate`` stays importable, and
``memfit.weights(model, bits="nf4")`` compresses while ``memfit.weights.CompressedWeights``
does. :func:`make_callable` gives such a package's module object a class whose
``__call__`` calls the package's function of that name (looked up at each call, so
patching ``memfit.plan.plan`` patches ``memfit.plan(...)`` too); nothing else about
the module changes.
"""

from __future__ import annotations

import sys
import types
from typing import Any


class CallablePackage(types.ModuleType):
    """A package module that can be called: ``__call__`` forwards to the module's
    attribute named ``__call_name__``."""

    __call_name__: str

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return getattr(self, self.__call_name__)(*args, **kwargs)


def make_callable(module_name: str, function_name: str) -> None:
    """Make the (already imported) module ``module_name`` callable as its function
    ``function_name``."""
    module = sys.modules[module_name]
    module.__class__ = CallablePackage
    module.__call_name__ = function_name
