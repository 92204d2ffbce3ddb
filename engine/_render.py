"""Terminal rendering for the CLI: progress lines, tables, JSON. Library code never prints."""

from __future__ import annotations

import json
import sys
import time
from contextlib import contextmanager
from typing import Callable, Iterator

__all__ = ["emit_json", "progress_lines"]


def emit_json(obj: object) -> None:
    """The one way a ``--json`` command writes: one object, one line, on stdout."""
    sys.stdout.write(json.dumps(obj, sort_keys=False) + "\n")
    sys.stdout.flush()


@contextmanager
def progress_lines(title: str, *, quiet: bool = False) -> Iterator[Callable[[str], None]]:
    """Yield a callback that shows progress on stderr: a live spinner on a TTY, plain lines otherwise."""
    if quiet:
        yield lambda _line: None
        return
    if sys.stderr.isatty():
        from rich.console import Console

        console = Console(stderr=True)
        started = time.monotonic()
        with console.status(title) as status:

            def update(line: str) -> None:
                status.update(f"{title} [{time.monotonic() - started:5.1f}s] {line[:100]}")

            yield update
        return
    last = [0.0]

    def plain(line: str) -> None:
        # Tools like debootstrap print hundreds of lines; a log reader needs a few per second at most.
        now = time.monotonic()
        if now - last[0] >= 0.5 or not line.startswith(("I: Retrieving", "I: Validating", "I: Extracting", "I: Unpacking", "I: Configuring")):
            last[0] = now
            sys.stderr.write(f"{title}: {line}\n")
            sys.stderr.flush()

    yield plain
