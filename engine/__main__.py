"""``python -m dockyard`` is the ``dockyard`` command."""

from .cli import main

main()
