"""The agent process: ``python -m dockyard.cli._daemon --home HOME``.

It is the machine's agent (:class:`dockyard.compute.Agent`) with the CLI's front door open, so a
``dockyard run`` can be done in this already-warm process (``_remote``). It lives with the CLI
because the front door prints what the CLI prints; :func:`dockyard.compute.ensure_agent` starts it.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    from .._home import dockyard_home
    from ..compute import Agent
    from ._remote import make_handler

    parser = argparse.ArgumentParser(prog="python -m dockyard.cli._daemon", description="dockyard's agent")
    parser.add_argument("--home", default=None, help="the dockyard home whose workspaces it serves")
    parser.add_argument("--poll", type=float, default=0.2)
    args = parser.parse_args(argv)
    home = Path(args.home) if args.home else dockyard_home()
    return Agent(home, poll=args.poll, front_door=make_handler(home)).serve()


if __name__ == "__main__":
    sys.exit(main())
