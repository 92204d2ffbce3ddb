"""The ``dockyard`` command: parse, call one library function, render. Errors are mapped in one place."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable

import click

from .. import __version__
from ..errors import DockyardError
from . import _compute, _images, _locks, _runs
from ._terminal import emit_json

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(__version__, prog_name="dockyard")
def cli(debug: bool) -> None:
    """dockyard: build ML environments once, run training jobs on your GPUs."""


for _command in (_images.doctor, _images.base, _images.env, _images.cache, _compute.compute,
                 _runs.run_command, _runs.runs, _runs.gpus_command, _runs.agent):
    cli.add_command(_command)
for _command in (_locks.env_show, _locks.env_lock):
    _images.env.add_command(_command)


def _wants(flag: str, argv: list[str]) -> bool:
    return flag in argv[: argv.index("--")] if "--" in argv else flag in argv


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map every error to a message and an exit code.

    Exit codes: 0 success, 1 the job failed, 2 bad input or usage, 3 environment problem.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    guarded(args, lambda: cli.main(args=args, prog_name="dockyard", standalone_mode=False))


def resume_run(args: list[str], workspace: str, run_id: str, offset: int, *, detached: bool) -> None:
    """Finish a ``dockyard run`` that the agent's front door queued and then stopped serving
    (the agent went away, or Ctrl-C): follow it here from output byte ``offset``."""
    guarded(args, lambda: _runs.resume(args, workspace, run_id, offset, detached=detached))


def guarded(args: list[str], call: Callable[[], object]) -> None:
    """Run ``call`` and map what it raises onto one message and an exit code (never a traceback)."""
    debug = _wants("--debug", args) or os.environ.get("DOCKYARD_DEBUG") == "1"
    as_json = _wants("--json", args)
    try:
        call()
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    except DockyardError as exc:
        _report(exc, exc.exit_code, exc.hint, debug, as_json)
    except Exception as exc:  # noqa: BLE001 - the last line of defence: never a bare traceback
        from dockyard.cache import CacheError  # the embeddable cache's own root

        if isinstance(exc, CacheError):
            _report(exc, exc.exit_code, exc.hint, debug, as_json)
        _report(exc, 1, "this is a dockyard bug; rerun with --debug and report the traceback", debug, as_json)


def _report(exc: BaseException, code: int, hint: str, debug: bool, as_json: bool) -> None:
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    if debug:
        import traceback  # only when asked: it costs every process an import otherwise

        traceback.print_exception(exc, file=sys.stderr)
    if as_json:
        emit_json({"error": {"type": type(exc).__name__, "message": message, "hint": hint, "exit_code": code}})
    click.echo(f"error: {message}", err=True)
    _details(exc)
    if hint:
        click.echo(f"  hint: {hint}", err=True)
    sys.exit(code)


def _details(exc: BaseException) -> None:
    """The data an error carries that a person needs to act: Dockerfile line, exit code, log tail."""
    line, dockerfile = getattr(exc, "dockerfile_line", None), getattr(exc, "dockerfile", "")
    if line and dockerfile:
        lines = dockerfile.splitlines()
        if 0 < line <= len(lines):
            click.echo(f"  Dockerfile line {line}: {lines[line - 1].strip()}", err=True)
    code = getattr(exc, "exit_code_of_step", None)
    if code is not None:
        click.echo(f"  exit code: {code}", err=True)
    tail = getattr(exc, "log_tail", "")
    if tail:
        click.echo("  last output:", err=True)
        for text in tail.splitlines()[-15:]:
            click.echo(f"    {text}", err=True)
