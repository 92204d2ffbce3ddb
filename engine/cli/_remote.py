"""``dockyard run`` done by the agent on behalf of a client (see ``dockyard.compute._frontdoor``).

The same library calls and the same printing as the click command, in the agent's process, where
they cost no imports. Whatever this handler is not certain to do exactly as the client's own
process would, it hands back (``reply.fallback``) before queueing anything: another configuration,
a base registry whose password only the client's environment holds, an option it does not parse
here, any error to report (the client then reports it itself, word for word as always).
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from ..errors import DockyardError
from ._common import finish_run, resolve, submitted_line, workspace_named

if TYPE_CHECKING:  # pragma: no cover
    from .. import Workspace
    from ..compute import Reply, Request

__all__ = ["CONFIG_PREFIXES", "RunArgs", "make_handler", "parse_run_args"]

#: Variables that change what a submit does; a client whose values differ is served by itself.
#: (Not DOCKYARD_HOME: a client reaches this agent through the socket in its own home.)
CONFIG_PREFIXES = ("DOCKYARD_", "DOCKER_")
_NOT_COMPARED = ("DOCKYARD_HOME",)
_VALUED = {"--source": "source", "--env": "env_file", "--compute": "compute", "--experiment": "experiment",
           "--workspace": "workspace"}
_FLAGS = {"--json": "as_json", "--detach": "detach"}


class RunArgs:
    """``dockyard run``'s arguments, as the click command would read them."""

    def __init__(self) -> None:
        self.script = ""
        self.args: list[str] = []
        self.source = "."
        self.env_file: str | None = None
        self.compute: str | None = None
        self.experiment = "default"
        self.workspace: str | None = None
        self.as_json = False
        self.detach = False


def parse_run_args(argv: tuple[str, ...] | list[str]) -> RunArgs | None:
    """``run SCRIPT [--source D] [--env F] [--compute C] [--experiment E] [--workspace W] [--json]
    [--detach] [-- ARGS...]``; None for anything else (another option, a second positional, help):
    the click command reads those, not this."""
    if not argv or argv[0] != "run":
        return None
    parsed = RunArgs()
    rest = list(argv[1:])
    script = None
    i = 0
    while i < len(rest):
        arg = rest[i]
        if arg == "--":
            parsed.args = rest[i + 1:]
            break
        name, eq, value = arg.partition("=")
        if name in _VALUED:
            if not eq:
                if i + 1 >= len(rest):
                    return None
                i += 1
                value = rest[i]
            setattr(parsed, _VALUED[name], value)
        elif arg in _FLAGS:
            setattr(parsed, _FLAGS[arg], True)
        elif arg.startswith("-") or script is not None:
            return None
        else:
            script = arg
        i += 1
    if not script:
        return None
    parsed.script = script
    return parsed


def config_of(environ: Mapping[str, str]) -> dict[str, str]:
    # Password-like names are neither sent by clients nor kept by the agent: not configuration.
    return {k: v for k, v in environ.items()
            if k.startswith(CONFIG_PREFIXES) and k not in _NOT_COMPARED and "PASSW" not in k.upper()}


def make_handler(home: Path):  # type: ignore[no-untyped-def]
    """The front-door handler of the agent of ``home``."""
    # One Workspace (one open run store) per workspace for the agent's life, shared by the clients.
    workspaces: dict[str, Workspace] = {}
    lock = threading.Lock()

    def workspace(a: RunArgs, cwd: str) -> Workspace | None:
        found = workspace_named(a.workspace, cwd=cwd, home=home)
        if found.home.resolve() != home.resolve():
            return None  # a config.json naming another home
        with lock:
            return workspaces.setdefault(found.name, found)

    def handle(request: Request, reply: Reply) -> None:
        run_args = parse_run_args(request.argv)
        if run_args is None:
            reply.fallback("not a plain `dockyard run`")
            return
        if config_of(request.environ) != config_of(os.environ):
            reply.fallback("the client's DOCKYARD_*/DOCKER_* configuration differs from the agent's")
            return
        _run(request, reply, run_args, workspace)

    return handle


def _run(request: Request, reply: Reply, a: RunArgs, workspace: Callable[[RunArgs, str], Workspace | None]) -> None:
    from .. import Environment, Experiment, ScriptRunConfig

    try:
        ws = workspace(a, request.cwd)
        if ws is None:
            reply.fallback("the workspace lives in another dockyard home")
            return
        env = Environment.load(resolve(request.cwd, a.env_file)) if a.env_file else None
        if env is not None and env.docker.base_image_registry.address and env.docker.base_image_registry.password_env:
            reply.fallback("the base registry's password is in the client's environment")
            return
        config = ScriptRunConfig(source_directory=resolve(request.cwd, a.source), script=a.script,
                                 arguments=a.args, compute_target=a.compute, environment=env)
        run = Experiment(ws, a.experiment).submit(config)
    except DockyardError as exc:
        # Nothing was queued: the client reports the error itself, exactly as it always does.
        reply.fallback(f"{type(exc).__name__}: {exc.message}")
        return
    reply.queued(ws.name, run.id)
    if a.detach:
        reply.stdout(json.dumps(run.to_json()) + "\n" if a.as_json else submitted_line(run.id))
        reply.exit(0)
        return
    run.follow(not a.as_json, text=reply.stdout, log=reply.log, revive=False,
               note=None if a.as_json else reply.stderr)
    reply.exit(finish_run(run, a.as_json, reply.stdout, reply.stderr))

