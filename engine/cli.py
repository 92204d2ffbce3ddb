"""The ``dockyard`` command: parse, call one library function, render. Errors are mapped in one place."""

from __future__ import annotations

import os
import sys
import time
import traceback

import click

from . import __version__
from ._render import emit_json, progress_lines
from .errors import DockyardError

__all__ = ["cli", "main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--debug", is_flag=True, help="Show Python tracebacks for errors.")
@click.version_option(__version__, prog_name="dockyard")
def cli(debug: bool) -> None:
    """dockyard: build ML environments once, run training jobs on your GPUs."""


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(as_json: bool) -> None:
    """Check the engine, BuildKit, the index, GPUs and base images; say how to fix what is missing."""
    from ._doctor import run_doctor

    report = run_doctor()
    if as_json:
        emit_json(report.to_json())
    else:
        for check in report.checks:
            mark = "ok " if check.ok else ("FAIL" if check.required else "warn")
            click.echo(f"[{mark:<4}] {check.name:<12} {check.detail}")
        click.echo("healthy" if report.ok else "not healthy: fix the FAIL lines above")
    if not report.ok:
        sys.exit(3)


@cli.group()
def base() -> None:
    """Base images made locally, with no registry (also for air-gapped sites)."""


@base.command("bootstrap")
@click.option("--flavor", type=click.Choice(["python", "busybox"]), default="python", show_default=True,
              help="python: Debian minbase with python3, pip, venv; busybox: a tiny static image.")
@click.option("--suite", default=None, help="Debian suite (default: the host's).")
@click.option("--mirror", default=None, help="Debian archive URL (default: the one apt uses here).")
@click.option("--ca-bundle", default=None, metavar="FILE|none",
              help="PEM bundle to trust inside the image (default: the host's bundle; 'none' adds nothing).")
@click.option("--force", is_flag=True, help="Rebuild even if the image exists.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def base_bootstrap(flavor: str, suite: str | None, mirror: str | None, ca_bundle: str | None,
                   force: bool, as_json: bool) -> None:
    """Make a base image from the Debian mirror (debootstrap) or busybox-static, and import it."""
    from ._base import HOST_CA_BUNDLE, bootstrap

    bundle = None if ca_bundle == "none" else (ca_bundle or HOST_CA_BUNDLE)
    if ca_bundle is None and not os.path.exists(HOST_CA_BUNDLE):
        bundle = None
    with progress_lines(f"bootstrap {flavor}") as progress:
        image = bootstrap(flavor, suite=suite, mirror=mirror, ca_bundle=bundle, force=force,  # type: ignore[arg-type]
                          progress=progress)
    if as_json:
        emit_json(image.to_json())
    elif image.existed:
        click.echo(f"{image.ref} already exists (created {image.created}); --force rebuilds it")
    else:
        click.echo(f"{image.ref} made in {image.seconds:.1f}s ({image.image_id[:19]})")


@base.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def base_ls(as_json: bool) -> None:
    """List the base images dockyard made."""
    from ._base import list_base_images

    images = list_base_images()
    if as_json:
        emit_json({"images": [i.to_json() for i in images]})
        return
    if not images:
        click.echo("no base images; make one with `dockyard base bootstrap`")
    for i in images:
        click.echo(f"{i.ref:<36} {i.flavor:<8} {i.suite:<10} {i.created}")


@cli.group()
def env() -> None:
    """Environment specs: content keys and what makes two specs differ."""


_ENV_FILE = click.Path(dir_okay=False, path_type=str)


@env.command("key")
@click.argument("file", type=_ENV_FILE)
@click.option("--explain", is_flag=True, help="Show each part's own hash, to see why a cache missed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_key(file: str, explain: bool, as_json: bool) -> None:
    """Print the content key of the environment in FILE (no engine needed)."""
    from ._environment import Environment
    from ._explain import describe_parts

    environment = Environment.load(file)
    key = environment.content_key()
    if as_json:
        emit_json(key.to_json())
        return
    click.echo(key.hex)
    if explain:
        click.echo(f"schema {key.schema}; parts:")
        for name, digest, summary in describe_parts(environment, key):
            click.echo(f"  {name:<13} {digest}  {summary}")
        changed = _changed_since_last_build(file, key)
        if changed is not None:
            click.echo(f"since the last build of this file: {changed}")


def _changed_since_last_build(file: str, key: object) -> str | None:
    """Which parts differ from the image last built from this same file (None: never built)."""
    from dockyard.cache import ImageCache

    from ._explain import field_of_part
    from ._home import index_path

    if not index_path().exists():
        return None
    index = ImageCache(index_path())
    try:
        old_key = index.remembered_key(os.path.abspath(file))
        entry = index.lookup(old_key) if old_key else None
    finally:
        index.close()
    if entry is None:
        return None
    # `env key` does not resolve the base image (it works offline), so its digest part is not compared.
    differs = [name for name, digest in key.parts.items()  # type: ignore[attr-defined]
               if name != "base_digest" and entry.parts.get(name) not in (None, digest)]
    if not differs:
        return f"no part changed (image {entry.image})"
    return "changed " + ", ".join(f"{name} ({field_of_part(name)})" for name in differs) + f"; was {entry.key}"


@env.command("diff")
@click.argument("a", type=_ENV_FILE)
@click.argument("b", type=_ENV_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_diff(a: str, b: str, as_json: bool) -> None:
    """Name the key parts in which environments A and B differ (exit 1 when they differ, like diff)."""
    from dockyard.cache import diff_keys

    from ._environment import Environment
    from ._explain import field_of_part

    key_a, key_b = Environment.load(a).content_key(), Environment.load(b).content_key()
    parts = diff_keys(key_a, key_b)
    if as_json:
        emit_json({"same": not parts, "a": key_a.hex, "b": key_b.hex, "parts": parts,
                   "fields": [field_of_part(p) for p in parts]})
    elif not parts:
        click.echo(f"same key {key_a.hex}")
    else:
        click.echo(f"{key_a.hex} != {key_b.hex}; they differ in:")
        for part in parts:
            click.echo(f"  {part:<13} ({field_of_part(part)})")
    if parts:
        sys.exit(1)


@env.command("render")
@click.argument("file", type=_ENV_FILE)
def env_render(file: str) -> None:
    """Print the Dockerfile dockyard builds for the environment in FILE (and its context files)."""
    from ._dockerfile import render
    from ._environment import Environment

    environment = Environment.load(file)
    rendered = render(environment, environment.content_key())
    click.echo(rendered.dockerfile, nl=False)
    for name, data in sorted(rendered.context.items()):
        click.echo(f"# --- context file {name} ({len(data)} bytes) ---")
        click.echo(data.decode(errors="replace"), nl=False)


@env.command("build")
@click.argument("file", type=_ENV_FILE)
@click.option("--no-cache", is_flag=True, help="Rebuild from scratch and replace the cached image.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "tty", "plain", "json"]), default="auto",
              show_default=True, help="How to show build progress (on stderr).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_build(file: str, no_cache: bool, progress_mode: str, as_json: bool) -> None:
    """Build the environment in FILE once; later calls are cache hits in milliseconds."""
    from ._builder import Builder
    from ._environment import Environment
    from ._render import BuildProgress

    environment = Environment.load(file)
    builder = Builder()
    try:
        # The view draws nothing until the first event: a cache hit never loads rich or grpc.
        with BuildProgress(progress_mode, f"building {environment.name}") as view:
            image = builder.ensure_image(environment, no_cache=no_cache, progress=view.note, on_event=view.event)
    finally:
        builder.close()
    if as_json:
        emit_json(image.to_json())
    elif image.cached:
        click.echo(f"{image.image} (cache hit in {image.seconds * 1000:.1f} ms)")
    else:
        click.echo(f"{image.image} built in {image.seconds:.1f}s ({image.image_id[:19]})")


@env.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_ls(as_json: bool) -> None:
    """List the environment images in the index (most recently used first)."""
    _list_entries(as_json)


@cli.group()
def cache() -> None:
    """The image index: what is cached, how much it holds, and clearing space."""


def _open_cache():  # type: ignore[no-untyped-def]
    from dockyard.cache import ImageCache

    from ._home import index_path

    return ImageCache(index_path())


def _list_entries(as_json: bool) -> None:
    index = _open_cache()
    try:
        entries = sorted(index.entries(), key=lambda e: e.last_used, reverse=True)
    finally:
        index.close()
    if as_json:
        emit_json({"images": [e.to_json() for e in entries]})
        return
    if not entries:
        click.echo("no environment images yet; build one with `dockyard env build FILE`")
    for e in entries:
        pin = " pinned" if e.pinned else ""
        click.echo(f"{e.key}  {e.image:<48} {e.size / 1e6:8.1f} MB  hits {e.hit_count}{pin}")


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_ls(as_json: bool) -> None:
    """List cached environment images (most recently used first)."""
    _list_entries(as_json)


@cache.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_stats(as_json: bool) -> None:
    """How many images the index holds, their size and hits."""
    index = _open_cache()
    try:
        stats = index.stats()
    finally:
        index.close()
    if as_json:
        emit_json(stats.to_json())
        return
    click.echo(f"index    {stats.path}")
    click.echo(f"entries  {stats.entries} ({stats.pinned} pinned, {stats.leases} building)")
    click.echo(f"size     {stats.total_bytes / 1e6:.1f} MB")
    click.echo(f"hits     {stats.hits}")


@cache.command("gc")
@click.option("--keep-bytes", default=None, metavar="SIZE", help="Shrink to at most SIZE (e.g. 20G, 500MiB).")
@click.option("--keep-days", type=float, default=None, help="Drop images unused for more than N days.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_gc(keep_bytes: str | None, keep_days: float | None, dry_run: bool, as_json: bool) -> None:
    """Remove least-recently-used images (never pinned ones, never ones a container uses)."""
    from ._engine import EngineAddress
    from ._gc import images_in_use, parse_size, remove_image

    if keep_bytes is None and keep_days is None:
        raise click.UsageError("give --keep-bytes SIZE and/or --keep-days N")
    limit = parse_size(keep_bytes) if keep_bytes is not None else None
    engine = EngineAddress.from_env()
    index = _open_cache()
    try:
        used = images_in_use(engine)
        in_use = [e.key for e in index.entries() if e.image_id in used]
        report = index.gc(keep_bytes=limit, keep_days=keep_days, in_use=in_use, dry_run=dry_run,
                          remove=lambda entry: remove_image(engine, entry.image))
    finally:
        index.close()
    if as_json:
        emit_json(report.to_json())
        return
    verb = "would remove" if dry_run else "removed"
    for entry in report.removed:
        click.echo(f"{verb} {entry.image} ({entry.size / 1e6:.1f} MB)")
    for failure in report.errors:
        click.echo(f"kept {failure.image}: {failure.error}", err=True)
    click.echo(f"{verb} {len(report.removed)} image(s), {report.freed_bytes / 1e6:.1f} MB; "
               f"{report.kept} left ({report.remaining_bytes / 1e6:.1f} MB)")


def _set_pin(key: str, pinned: bool) -> None:
    index = _open_cache()
    try:
        found = index.pin(key) if pinned else index.unpin(key)
    finally:
        index.close()
    if not found:
        raise click.UsageError(f"no cached image with key {key}; see `dockyard cache ls`")
    click.echo(f"{'pinned' if pinned else 'unpinned'} {key}")


@cache.command("pin")
@click.argument("key")
def cache_pin(key: str) -> None:
    """Keep the image of KEY through every GC."""
    _set_pin(key, True)


@cache.command("unpin")
@click.argument("key")
def cache_unpin(key: str) -> None:
    """Let GC remove the image of KEY again."""
    _set_pin(key, False)


# -- runs -------------------------------------------------------------------------------------------

_WORKSPACE = click.option("--workspace", "workspace_name", default=None, metavar="NAME",
                          help="Workspace (default: from config.json above the current folder, else 'default').")


def _workspace(name: str | None):  # type: ignore[no-untyped-def]
    from ._workflow import Workspace

    if name:
        return Workspace(name)
    try:
        return Workspace.from_config()
    except DockyardError:
        return Workspace("default")


def _run_json(run) -> dict:  # type: ignore[no-untyped-def]
    record = run._record()
    return {
        "id": record.id,
        "status": record.status,
        "exit_code": record.exit_code,
        "image": record.image,
        "gpus": list(record.gpus),
        "metrics": run._store().metrics(record.id),
        "experiment": record.experiment,
        "script": record.script,
        "compute": record.compute,
        "reason": record.reason,
        "created": record.created,
        "started": record.started,
        "ended": record.ended,
    }


@cli.command("run", context_settings={"ignore_unknown_options": True})
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--source", default=".", show_default=True, help="Source directory (snapshotted; the script is relative to it).")
@click.option("--env", "env_file", default=None, help="Environment file (default: the default python base image).")
@click.option("--compute", default=None, help="Compute target (default: local).")
@click.option("--experiment", default="default", show_default=True, help="Experiment name.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="GPUs the run needs (0 = CPU only).")
@click.option("--gpu-memory", "gpu_memory", type=click.IntRange(min=0), default=0, help="Minimum memory per GPU, MiB.")
@click.option("--gpu-name", default=None, help="Only GPUs whose name contains this (e.g. H100).")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher starts first.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds the run may take; lets shorter runs use GPUs reserved for a later start.")
@click.option("--detach", is_flag=True, help="Submit and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (waits for the end unless --detach).")
@_WORKSPACE
def run_command(script: str, args: tuple[str, ...], source: str, env_file: str | None, compute: str | None,
                experiment: str, gpus: int, gpu_memory: int, gpu_name: str | None, priority: int,
                time_limit: float | None, detach: bool, as_json: bool, workspace_name: str | None) -> None:
    """Run SCRIPT (in --source) in its environment's image and follow its output. Arguments after
    `--` go to the script."""
    from ._environment import Environment
    from ._workflow import Experiment, ScriptRunConfig

    ws = _workspace(workspace_name)
    env = Environment.load(env_file) if env_file else None
    config = ScriptRunConfig(source_directory=source, script=script, arguments=list(args),
                             compute_target=compute, environment=env, max_run_duration_seconds=time_limit,
                             gpus=gpus, gpu_memory_mib=gpu_memory, gpu_name=gpu_name, priority=priority)
    run = Experiment(ws, experiment).submit(config)
    if detach:
        if as_json:
            emit_json(_run_json(run))
        else:
            click.echo(f"submitted {run.id}; follow it with `dockyard runs logs -f {run.id}`")
        return
    run.wait_for_completion(show_output=not as_json, raise_on_error=False)
    doc = _run_json(run)
    if as_json:
        emit_json(doc)
    else:
        for name, values in doc["metrics"].items():
            click.echo(f"{name:<20} {_fmt(values[-1])}  ({len(values)} value{'s' if len(values) != 1 else ''})")
        if doc["status"] != "Completed":
            click.echo(f"{run.id} {doc['status']}: {doc['reason']}", err=True)
    if doc["status"] != "Completed":
        sys.exit(1)


def _fmt(value: object) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


@cli.group()
def runs() -> None:
    """Submitted runs: list, inspect, follow, cancel."""


@runs.command("ls")
@click.option("--experiment", default=None, help="Only this experiment's runs.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def runs_ls(experiment: str | None, as_json: bool, workspace_name: str | None) -> None:
    """List runs, newest first."""
    ws = _workspace(workspace_name)
    ws._revive_agent()  # runs left unfinished by a killed agent get followed again
    records = ws._store().list(experiment=experiment)
    if as_json:
        emit_json({"runs": [{"id": r.id, "status": r.status, "experiment": r.experiment, "script": r.script,
                             "exit_code": r.exit_code, "created": r.created} for r in records]})
        return
    if not records:
        click.echo("no runs yet; start one with `dockyard run SCRIPT`")
    for r in records:
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(r.created))
        code = "" if r.exit_code is None else f" exit {r.exit_code}"
        click.echo(f"{r.id:<44} {r.status:<10} {when}  {r.script}{code}")


def _find_run(ws, run_id: str):  # type: ignore[no-untyped-def]
    from ._run import Run
    from ._workflow import Experiment

    ws._revive_agent()
    record = ws._store().get(run_id)
    return Run(Experiment(ws, record.experiment), record.id)


@runs.command("show")
@click.argument("run_id")
@click.option("--plot", default=None, metavar="FILE", help="Also draw each metric series into a PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def runs_show(run_id: str, plot: str | None, as_json: bool, workspace_name: str | None) -> None:
    """Show a run: status, times, image, exit code and its metrics (table and sparklines)."""
    from ._render import sparkline

    run = _find_run(_workspace(workspace_name), run_id)
    doc = _run_json(run)
    if as_json:
        emit_json(doc)
    else:
        details = run.get_details()
        for key in ("runId", "experiment", "status", "target", "script", "image", "exitCode",
                    "submittedTimeUtc", "startTimeUtc", "endTimeUtc"):
            click.echo(f"{key:<18} {details.get(key)}")
        if doc["reason"]:
            click.echo(f"{'reason':<18} {doc['reason']}")
        if doc["metrics"]:
            click.echo("")
            click.echo(f"{'metric':<20} {'last':>10} {'min':>10} {'max':>10}  series")
            for name, values in doc["metrics"].items():
                numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
                if numbers:
                    click.echo(f"{name:<20} {_fmt(numbers[-1]):>10} {_fmt(min(numbers)):>10} {_fmt(max(numbers)):>10}  {sparkline(numbers)}")
                else:
                    click.echo(f"{name:<20} {_fmt(values[-1]):>10}")
    if plot:
        from ._render import plot_metrics

        plot_metrics(doc["metrics"], plot, title=run_id)
        if not as_json:
            click.echo(f"plot written to {plot}")


@runs.command("logs")
@click.argument("run_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the run ends.")
@_WORKSPACE
def runs_logs(run_id: str, follow: bool, workspace_name: str | None) -> None:
    """Print a run's output (stdout and stderr, in order)."""
    run = _find_run(_workspace(workspace_name), run_id)
    if follow:
        run.wait_for_completion(show_output=True, raise_on_error=False)
        return
    path = run._log_path()
    if path.exists():
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                sys.stdout.buffer.write(chunk)
        sys.stdout.flush()


@runs.command("cancel")
@click.argument("run_id")
@_WORKSPACE
def runs_cancel(run_id: str, workspace_name: str | None) -> None:
    """Cancel a run (queued: at once; running: its container or process is stopped)."""
    run = _find_run(_workspace(workspace_name), run_id)
    run.cancel()
    click.echo(f"cancel requested for {run_id} (now {run.get_status()})")


@cli.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def gpus_command(as_json: bool, workspace_name: str | None) -> None:
    """The machine's GPUs (or declared virtual ones), who holds each, and the runs waiting for them."""
    from ._gpu import inventory
    from ._leases import LeaseStore

    ws = _workspace(workspace_name)
    found = inventory()
    leases = LeaseStore(ws.home)
    try:
        held = leases.held()
    finally:
        leases.close()
    queue = [r for r in ws._store().queued() if r.gpu_count]
    doc = {
        "gpus": [{"index": g.index, "uuid": g.uuid, "name": g.name, "memory_mib": g.memory_mib,
                  "virtual": g.virtual, "holder": held.get(g.uuid)} for g in found.gpus],
        "queue": [{"run": r.id, "gpus": r.gpu_count, "reason": r.reason or "waiting for the agent"} for r in queue],
    }
    if as_json:
        emit_json(doc)
        return
    if not found.gpus:
        click.echo(f"no GPUs: {found.reason}")
        click.echo("(for development, declare virtual ones: DOCKYARD_GPUS=4 dockyard gpus)")
    for g in doc["gpus"]:
        tag = " (virtual)" if g["virtual"] else ""
        holder = g["holder"] or "free"
        click.echo(f"{g['index']:>2}  {g['uuid']:<42} {g['name']}{tag}  {g['memory_mib']} MiB  {holder}")
    for q in doc["queue"]:
        click.echo(f"waiting: {q['run']} needs {q['gpus']} GPU(s): {q['reason']}")


@cli.group()
def agent() -> None:
    """The background agent that starts and follows runs (started automatically on submit)."""


@agent.command("start")
@_WORKSPACE
def agent_start(workspace_name: str | None) -> None:
    """Start the agent for the workspace unless it runs."""
    from ._agent import ensure_agent

    ws = _workspace(workspace_name)
    status = ensure_agent(ws.directory, images_home=ws.home)
    if not status["running"]:
        raise DockyardError("the agent did not start", hint=f"read {status['log']}")
    click.echo(f"agent running (pid {status['pid']}); log: {status['log']}")


@agent.command("stop")
@_WORKSPACE
def agent_stop(workspace_name: str | None) -> None:
    """Stop the agent; running runs go on and the next agent adopts them."""
    from ._agent import stop_agent

    click.echo("agent stopped" if stop_agent(_workspace(workspace_name).directory) else "no agent was running")


@agent.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def agent_status_command(as_json: bool, workspace_name: str | None) -> None:
    """Whether the agent runs, its pid and log."""
    from ._agent import agent_status

    status = agent_status(_workspace(workspace_name).directory)
    if as_json:
        emit_json(status)
    else:
        click.echo(f"agent {'running (pid ' + str(status['pid']) + ')' if status['running'] else 'not running'}; log: {status['log']}")


def _wants(flag: str, argv: list[str]) -> bool:
    return flag in argv[: argv.index("--")] if "--" in argv else flag in argv


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the CLI and map every error to a message and an exit code.

    Exit codes: 0 success, 1 the job failed, 2 bad input or usage, 3 environment problem.
    """
    args = list(sys.argv[1:] if argv is None else argv)
    debug = _wants("--debug", args) or os.environ.get("DOCKYARD_DEBUG") == "1"
    as_json = _wants("--json", args)
    try:
        cli.main(args=args, prog_name="dockyard", standalone_mode=False)
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
