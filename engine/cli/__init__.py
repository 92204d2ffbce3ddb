"""``dockyard.cli``: the ``dockyard`` command. Nothing imports it; it imports only public names.

The entry point is :func:`dockyard.cli._fastpath.main`, which answers a few common commands
without importing click, and hands everything else to the click application in ``_app``.
"""

from .._lazy import lazy_exports

TYPE_CHECKING = False

_EXPORTS = {"cli": "._app", "main": "._fastpath"}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ._app import cli
    from ._fastpath import main
