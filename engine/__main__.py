"""``python -m dockyard`` is the ``dockyard`` command."""

from .cli._fastpath import main

main()
