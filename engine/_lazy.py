"""Lazy package exports (PEP 562), shared by dockyard's package ``__init__`` modules.

A package ``__init__`` that imported its modules eagerly would make every import of one of its
light modules (the CLI's fast lane, the in-run API, a raw one-request engine check) pay for the
heavy ones. Standard library only, Python >= 3.8 syntax: ``dockyard.core`` uses it inside images.
"""

from importlib import import_module

__all__ = ["lazy_exports"]


def lazy_exports(package, exports):  # type: ignore[no-untyped-def]
    """``(__getattr__, __dir__)`` for ``package`` whose public names live in other modules.

    ``exports`` maps a public name to the module defining it (relative to ``package`` when it
    starts with a dot). A name is imported on first use and then cached in the package.
    """
    namespace = import_module(package).__dict__

    def __getattr__(name):  # type: ignore[no-untyped-def]
        try:
            module = exports[name]
        except KeyError:
            raise AttributeError("module {!r} has no attribute {!r}".format(package, name)) from None
        value = getattr(import_module(module, package), name)
        namespace[name] = value  # later lookups skip __getattr__
        return value

    def __dir__():  # type: ignore[no-untyped-def]
        return sorted(namespace.get("__all__", exports))

    return __getattr__, __dir__
