"""``dockyard env show`` and ``env lock``: what an environment's build resolved, and pinning it."""

from __future__ import annotations

import click

from ._terminal import emit_json

__all__ = ["env_lock", "env_show"]

_ENV_FILE = click.Path(dir_okay=False, path_type=str)


@click.command("show")
@click.argument("file", type=_ENV_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_show(file: str, as_json: bool) -> None:
    """Show the image of the environment in FILE, its lock, and the versions its build resolved
    (recorded at build time: unpinned requirements are frozen by the cache; `env lock` pins them)."""
    from .. import Environment
    from ..build import Builder, show_environment

    builder = Builder()
    try:
        report = show_environment(builder, Environment.load(file))
    finally:
        builder.close()
    if as_json:
        emit_json(report.to_json())
        return
    click.echo(f"environment  {report.name} ({file})")
    click.echo(f"key          {report.key}")
    if report.note:
        click.echo(f"note         base not resolved: {report.note}")
    click.echo(f"image        {report.image or 'not built yet (`dockyard env build ' + file + '`)'}")
    if report.lock is None:
        click.echo(f"lock         none (`dockyard env lock {file}` pins the versions below)")
    elif report.stale:
        click.echo(f"lock         {report.lock} is STALE ({report.stale}): builds refuse it; "
                   f"`dockyard env lock {file}` again, or delete it")
    else:
        click.echo(f"lock         {report.lock} ({report.lock_pins} pins: builds install exactly these)")
    found = report.resolution
    if found is None:
        if report.image:
            click.echo("resolved     not recorded (built before dockyard recorded resolutions, or no pip packages)")
        return
    near = f", a near miss of {found.neighbour}" if found.neighbour else ""
    click.echo(f"installer    {found.installer}{near}")
    click.echo(f"resolved     {len(found.packages)} packages (from the {found.source}):")
    for line in found.packages:
        click.echo(f"  {line}")


@click.command("lock")
@click.argument("file", type=_ENV_FILE)
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "tty", "plain", "json"]), default="auto",
              show_default=True, help="How to show build progress, if a build is needed (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_lock(file: str, progress_mode: str, as_json: bool) -> None:
    """Pin the versions the environment in FILE resolved to, in a lock next to it
    (FILE's name with .lock.txt); builds install exactly those from then on, and the key covers them.

    The image of FILE's requirements (ignoring any lock) is built first when it is not there."""
    from .. import Environment
    from .._lockfile import lock_path
    from ..build import Builder, lock_environment
    from ._terminal import BuildProgress

    env = Environment.load(file)
    target = env.lock.path if env.lock is not None else lock_path(file)
    builder = Builder()
    try:
        with BuildProgress(progress_mode, f"resolving {env.name}") as view:
            report = lock_environment(builder, env, target, progress=view.note, on_event=view.event)
    finally:
        builder.close()
    if as_json:
        emit_json(report.to_json())
        return
    verb = "wrote" if report.changed else "unchanged:"
    click.echo(f"{verb} {report.path} ({len(report.packages)} pins from {report.image}, {report.installer})")
