"""``python -m dockyard`` is the ``dockyard`` command."""

from ._fastpath import main

main()
