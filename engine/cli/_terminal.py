"""Terminal rendering for the CLI: progress lines, tables, JSON. Library code never prints."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["BuildProgress", "emit_json", "plot_metrics", "progress_lines", "sparkline"]


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


class BuildProgress:
    """Renders BuildKit events: a live view on a TTY, plain lines otherwise, JSON lines for machines.

    Everything goes to stderr: stdout belongs to the command's result (``--json``).
    """

    def __init__(self, mode: str, title: str) -> None:
        if mode == "auto":
            mode = "tty" if sys.stderr.isatty() else "plain"
        self.mode = mode
        self.title = title
        self._live = None
        self._done: list[str] = []
        self._current = ""
        self._log = ""
        self._started = time.monotonic()

    def __enter__(self) -> BuildProgress:
        return self

    def _start_live(self) -> None:
        # Started on the first event only, so a cache hit never pays for importing rich.
        if self.mode == "tty" and self._live is None:
            from rich.console import Console
            from rich.live import Live

            self._live = Live(self._view(), console=Console(stderr=True), refresh_per_second=8, transient=False)
            self._live.__enter__()

    def __exit__(self, *exc: object) -> None:
        if self._live is not None:
            self._live.update(self._view(final=True))
            self._live.__exit__(None, None, None)

    def note(self, line: str) -> None:
        if self.mode == "json":
            self._json({"event": "note", "text": line})
        elif self.mode == "plain":
            sys.stderr.write(f"{line}\n")
        elif self.mode == "tty":
            self._log = line
            self._refresh()

    def event(self, ev: object) -> None:
        kind = getattr(ev, "kind", "")
        if self.mode == "json":
            self._json({"event": kind, **{k: getattr(ev, k) for k in ("name", "state", "index", "total", "text", "seconds")}})
            return
        name, state = getattr(ev, "name", ""), getattr(ev, "state", "")
        line = ev.plain()  # type: ignore[attr-defined]
        if self.mode == "plain":
            sys.stderr.write(f"{line}\n")
        if kind == "log":
            self._log = getattr(ev, "text", "")
        elif state == "started":
            self._current, self._log = name, ""
        else:
            self._done.append(line)
            if self._current == name:
                self._current = ""
        if self.mode == "plain":
            sys.stderr.flush()
        self._refresh()

    def _json(self, obj: dict[str, object]) -> None:
        sys.stderr.write(json.dumps(obj) + "\n")
        sys.stderr.flush()

    def _refresh(self) -> None:
        self._start_live()
        if self._live is not None:
            self._live.update(self._view())

    def _view(self, final: bool = False) -> object:
        from rich.text import Text

        text = Text()
        text.append(f"{self.title} [{time.monotonic() - self._started:.1f}s]\n", style="bold")
        for line in self._done[-8:]:
            style = "red" if line.endswith("ERROR") else ("dim" if line.endswith("CACHED") else "green")
            text.append(f"  {line}\n", style=style)
        if self._current and not final:
            text.append(f"  => {self._current}\n", style="yellow")
            if self._log:
                text.append(f"     {self._log[:120]}\n", style="dim")
        return text


_BARS = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float], width: int = 40) -> str:
    """A one-line chart of a series (the last ``width`` points)."""
    points = values[-width:]
    if not points:
        return ""
    low, high = min(points), max(points)
    span = (high - low) or 1.0
    return "".join(_BARS[min(len(_BARS) - 1, int((v - low) / span * (len(_BARS) - 1) + 0.5))] for v in points)


def _pyplot():  # type: ignore[no-untyped-def]
    from ..errors import InputError

    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise InputError("--plot needs matplotlib", hint="pip install 'dockyard[plot]' (./scripts/quickstart does)") from exc
    return plt


def plot_runs(series: dict[str, list[object]], path: str, title: str = "") -> None:
    """One metric of several runs (run id -> values) as lines in one PNG.

    Raises:
        InputError: matplotlib is not installed.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    for run_id, values in series.items():
        numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if numbers:
            ax.plot(range(1, len(numbers) + 1), numbers, marker="o", label=run_id)
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_metrics(metrics: dict[str, list[object]], path: str, title: str = "") -> None:
    """Draw each numeric series into one PNG.

    Raises:
        InputError: matplotlib is not installed.
    """
    plt = _pyplot()
    series = {k: [v for v in vs if isinstance(v, (int, float)) and not isinstance(v, bool)] for k, vs in metrics.items()}
    series = {k: v for k, v in series.items() if v}
    fig, axes = plt.subplots(max(1, len(series)), 1, figsize=(6, 2.2 * max(1, len(series))), squeeze=False)
    for ax, (name, values) in zip(axes[:, 0], series.items()):
        ax.plot(range(1, len(values) + 1), values, marker="o")
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
