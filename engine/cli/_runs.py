"""``dockyard run``, ``runs``, ``gpus`` and ``agent``: submitting and following runs."""

from __future__ import annotations

import sys
import time
from typing import TYPE_CHECKING, Any

import click

from ..errors import DockyardError
from ._common import detached_line, finish_run, fmt, run_by_id, submitted_line, workspace_named
from ._terminal import emit_json

if TYPE_CHECKING:  # pragma: no cover
    from .. import Run

__all__ = ["agent", "gpus_command", "run_command", "runs"]

_WORKSPACE = click.option("--workspace", "workspace_name", default=None, metavar="NAME",
                          help="Workspace (default: from config.json above the current folder, else 'default').")


class _RunCommand(click.Command):
    """``dockyard run``: an option dockyard does not know, before ``--``, is a usage error with a
    suggestion (``--detatch`` -> ``--detach``), never an argument quietly handed to the script."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        import difflib

        known = {opt for param in self.get_params(ctx) for opt in (*param.opts, *param.secondary_opts)}
        for arg in () if ctx.resilient_parsing else (args[: args.index("--")] if "--" in args else args):
            name = arg.split("=", 1)[0]
            if arg.startswith("-") and arg != "-" and name not in known:
                close = difflib.get_close_matches(name, sorted(o for o in known if o.startswith("--")), n=1,
                                                  cutoff=0.75)
                # click appends "Did you mean …?" when there is a close option.
                raise click.NoSuchOption(
                    name, message=f"no such option: {name} (arguments for the script go after `--`: "
                    f"dockyard run SCRIPT [OPTIONS] -- {arg} …).", possibilities=close, ctx=ctx)
        return super().parse_args(ctx, args)


@click.command("run", cls=_RunCommand, context_settings={"ignore_unknown_options": True})
@click.argument("script")
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.option("--source", default=".", show_default=True, help="Source directory (snapshotted; the script is relative to it).")
@click.option("--env", "env_file", default=None, type=click.Path(dir_okay=False), help="Environment file (default: the default python base image).")
@click.option("--compute", default=None, help="Compute target (default: local).")
@click.option("--experiment", default="default", show_default=True, help="Experiment name.")
@click.option("--gpus", type=click.IntRange(min=0), default=0, show_default=True, help="GPUs the run needs (0 = CPU only).")
@click.option("--gpu-memory", "gpu_memory", type=click.IntRange(min=0), default=0, help="Minimum memory per GPU, MiB.")
@click.option("--gpu-name", default=None, help="Only GPUs whose name contains this (e.g. H100).")
@click.option("--priority", type=int, default=0, show_default=True, help="Higher starts first.")
@click.option("--time-limit", type=click.FloatRange(min=0, min_open=True), default=None,
              help="Seconds the run may take; lets shorter runs use GPUs reserved for a later start.")
@click.option("--mount", "mounts", multiple=True, metavar="HOST:CONTAINER[:ro|rw]",
              help="Mount a host folder or file into the run (read-only unless :rw); repeat for more.")
@click.option("--shm-size", default=None, metavar="SIZE", help="Size of /dev/shm (default 2g, as Azure ML).")
@click.option("--detach", is_flag=True, help="Submit and return at once.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (waits for the end unless --detach).")
@_WORKSPACE
def run_command(script: str, args: tuple[str, ...], source: str, env_file: str | None, compute: str | None,
                experiment: str, gpus: int, gpu_memory: int, gpu_name: str | None, priority: int,
                time_limit: float | None, mounts: tuple[str, ...], shm_size: str | None, detach: bool,
                as_json: bool, workspace_name: str | None) -> None:
    """Run SCRIPT (in --source) in its environment's image and follow its output. Arguments after
    `--` go to the script (words after SCRIPT too; an unknown `--option` before `--` is an error)."""
    from .. import Environment, Experiment, ScriptRunConfig
    from ..core.runconfig import DockerConfiguration

    ws = workspace_named(workspace_name)
    env = Environment.load(env_file) if env_file else None
    docker = DockerConfiguration(shm_size=shm_size) if shm_size else None
    config = ScriptRunConfig(source_directory=source, script=script, arguments=list(args),
                             compute_target=compute, environment=env, max_run_duration_seconds=time_limit,
                             gpus=gpus, gpu_memory_mib=gpu_memory, gpu_name=gpu_name, priority=priority,
                             mounts=mounts, docker_runtime_config=docker)
    run = Experiment(ws, experiment).submit(config)
    if detach:
        if as_json:
            emit_json(run.to_json())
        else:
            _echo(submitted_line(run.id))
        return
    run.wait_for_completion(show_output=not as_json, raise_on_error=False)
    exit_after(run, as_json)


def _echo(text: str) -> None:
    click.echo(text, nl=False)


def _echo_err(text: str) -> None:
    click.echo(text, nl=False, err=True)


def resume(argv: list[str], workspace: str, run_id: str, offset: int, *, detached: bool) -> None:
    """Follow a run the agent's front door queued, from output byte ``offset``, and end like ``run``."""
    from .. import Workspace
    from ._remote import parse_run_args

    parsed = parse_run_args(argv)
    as_json, detach = (parsed.as_json, parsed.detach) if parsed else (False, False)
    run = Workspace(workspace).get_run(run_id)
    if detach:
        return
    if not detached:
        try:
            run.follow(not as_json, text=_echo, log=_echo_bytes, offset=offset, header=False,
                       note=None if as_json else _echo_err)
        except KeyboardInterrupt:
            _echo(detached_line(run_id))
    exit_after(run, as_json)


def _echo_bytes(data: bytes) -> None:
    sys.stdout.buffer.write(data)
    sys.stdout.buffer.flush()


def exit_after(run: Run, as_json: bool) -> None:
    """Print how the run ended and exit 1 unless it Completed (``dockyard run``'s last step)."""
    code = finish_run(run, as_json, _echo, _echo_err)
    if code:
        sys.exit(code)


def _complete_run_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Shell completion of run ids: the newest runs of the workspace (``--workspace`` if typed)."""
    try:
        ws = workspace_named(ctx.params.get("workspace_name"))
        return [r.id for r in ws.store.list(limit=500) if r.id.startswith(incomplete)]
    except DockyardError:
        return []  # completion must never print an error into the user's shell


@click.group()
def runs() -> None:
    """Submitted runs: list, inspect, follow, cancel."""


#: What ``runs ls`` asks the store for when it must count every matching run (SQLite's largest limit).
_EVERY_RUN = 2**63 - 1
#: The statuses ``--status`` takes; a unit test checks this against :class:`dockyard.runs.RunStatus`
#: (spelled out here so that building the CLI does not import the run store).
_STATUS_HELP = "Queued, Running, Completed, Failed or Canceled"


class _StatusList(click.ParamType):
    """``--status``: one run status or a comma list, in any case -> their canonical spellings."""

    name = "status"

    def get_metavar(self, param: click.Parameter, ctx: click.Context | None = None) -> str:
        return "STATUS[,STATUS]"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> tuple[str, ...]:
        if isinstance(value, tuple):  # already converted (a default)
            return value
        from ..runs import RunStatus

        spelled = {str(s).lower(): str(s) for s in RunStatus}
        found: list[str] = []
        for word in str(value).split(","):
            if not word.strip():
                continue
            status = spelled.get(word.strip().lower())
            if status is None:
                self.fail(f"{word.strip()!r} is not a run status; use one of {', '.join(spelled.values())} "
                          "(any case; repeat --status or separate with commas)", param, ctx)
            found.append(status)
        if not found:
            self.fail(f"no status given; use one of {', '.join(spelled.values())}", param, ctx)
        return tuple(found)


def _duration(seconds: float) -> str:
    """A run's duration for people: ``4.2s``, ``42s``, ``3m12s``, ``1h05m``, ``2d03h`` (rounded down)."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{int(seconds * 10) / 10:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


def _when(t: float, now: float) -> str:
    """A local time, short: ``14:03:12`` today, ``Mar 04 14:03`` this year, else ``2024-03-04 14:03``."""
    at, today = time.localtime(t), time.localtime(now)
    if at[:3] == today[:3]:
        return time.strftime("%H:%M:%S", at)
    if at.tm_year == today.tm_year:
        return time.strftime("%b %d %H:%M", at)
    return time.strftime("%Y-%m-%d %H:%M", at)


def _run_row(r: dict[str, Any], now: float) -> tuple[str, ...]:
    status = r["status"] if r["exit_code"] in (None, 0) else f"{r['status']} (exit {r['exit_code']})"
    started, ended = r["started"], r["ended"]
    if started is None:
        took = "-"  # queued, or ended before it started (canceled, a failed build)
    else:
        took = _duration((ended if ended is not None else now) - started)  # running: elapsed so far
    return (r["id"], r["experiment"], status, "-" if started is None else _when(started, now), took,
            r["compute"] or "-", str(len(r["gpus"])) if r["gpus"] else "-", r["script"])


_HEADER = ("ID", "EXPERIMENT", "STATUS", "STARTED", "DURATION", "TARGET", "GPUS", "SCRIPT")
_RIGHT = {"DURATION", "GPUS"}  # numbers line up on the right


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Rows under ``_HEADER``, each column as wide as its widest cell (the last is not padded)."""
    widths = [max(len(row[i]) for row in (_HEADER, *rows)) for i in range(len(_HEADER))]
    lines = []
    for row in (_HEADER, *rows):
        cells = [cell.rjust(w) if name in _RIGHT else cell.ljust(w) for name, cell, w in zip(_HEADER, row, widths)]
        lines.append("  ".join(cells).rstrip())
    return lines


@runs.command("ls")
@click.option("--experiment", default=None, help="Only this experiment's runs.")
@click.option("--status", "statuses", type=_StatusList(), multiple=True,
              help=f"Only runs with this status: {_STATUS_HELP} (any case; repeat or separate with commas).")
@click.option("--limit", type=click.IntRange(min=0), default=20, show_default=True, metavar="N",
              help="Show the newest N matching runs (0: all).")
@click.option("--all", "all_runs", is_flag=True, help="Show every matching run (same as --limit 0).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def runs_ls(experiment: str | None, statuses: tuple[tuple[str, ...], ...], limit: int, all_runs: bool,
            as_json: bool, workspace_name: str | None) -> None:
    """List runs, newest first: status, start time, duration, target and GPUs."""
    wanted = {s for group in statuses for s in group}
    # Every match is counted (for "showing N of M"), but only the shown runs are read in full.
    found = workspace_named(workspace_name).get_runs(experiment=experiment, limit=_EVERY_RUN,
                                                     statuses=sorted(wanted))
    total = len(found)
    shown = [run.to_json(metrics=False) for run in (found if all_runs or limit == 0 else found[:limit])]
    if as_json:
        emit_json({"runs": [{k: r[k] for k in ("id", "status", "experiment", "script", "exit_code", "created")}
                            for r in shown], "total": total})
        return
    if not shown:
        if wanted or experiment:
            which = " and ".join(filter(None, [
                f"status {' or '.join(sorted(wanted))}" if wanted else "",
                f"experiment {experiment!r}" if experiment else ""]))
            click.echo(f"no runs with {which}")
        else:
            click.echo("no runs yet; start one with `dockyard run SCRIPT`")
        return
    now = time.time()
    for line in _table([_run_row(r, now) for r in shown]):
        click.echo(line)
    if len(shown) < total:
        click.echo(f"showing {len(shown)} of {total} runs (--limit 0 for all)")


@runs.command("show")
@click.argument("run_id", shell_complete=_complete_run_ids)
@click.option("--plot", default=None, metavar="FILE", help="Also draw each metric series into a PNG (needs matplotlib).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def runs_show(run_id: str, plot: str | None, as_json: bool, workspace_name: str | None) -> None:
    """Show a run: status, times, image, exit code and its metrics (table and sparklines)."""
    from ._terminal import sparkline

    run = run_by_id(run_id, workspace_name)
    doc = run.to_json()
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
                    click.echo(f"{name:<20} {fmt(numbers[-1]):>10} {fmt(min(numbers)):>10} "
                               f"{fmt(max(numbers)):>10}  {sparkline(numbers)}")
                else:
                    click.echo(f"{name:<20} {fmt(values[-1]):>10}")
    if plot:
        from ._terminal import plot_metrics

        plot_metrics(doc["metrics"], plot, title=run_id)
        if not as_json:
            click.echo(f"plot written to {plot}")


@runs.command("logs")
@click.argument("run_id", shell_complete=_complete_run_ids)
@click.option("-f", "--follow", is_flag=True, help="Keep printing new output until the run ends.")
@_WORKSPACE
def runs_logs(run_id: str, follow: bool, workspace_name: str | None) -> None:
    """Print a run's output (stdout and stderr, in order)."""
    run = run_by_id(run_id, workspace_name)
    if follow:
        run.wait_for_completion(show_output=True, raise_on_error=False)
        return
    path = run.get_details()["logFiles"]["logs/std.log"]
    try:
        with open(path, "rb") as fh:
            while chunk := fh.read(1 << 20):
                sys.stdout.buffer.write(chunk)
    except FileNotFoundError:
        pass  # the run has printed nothing (yet)
    sys.stdout.flush()


@runs.command("cancel")
@click.argument("run_id", shell_complete=_complete_run_ids)
@_WORKSPACE
def runs_cancel(run_id: str, workspace_name: str | None) -> None:
    """Cancel a run (queued: at once; running: its container or process is stopped)."""
    run = run_by_id(run_id, workspace_name)
    run.cancel()
    click.echo(f"cancel requested for {run_id} (now {run.get_status()})")


@runs.command("rm")
@click.argument("run_ids", nargs=-1, shell_complete=_complete_run_ids)
@click.option("--older-than", "older_than", type=click.FloatRange(min=0), default=None, metavar="DAYS",
              help="Also every finished run that ended more than DAYS ago.")
@click.option("--experiment", default=None, help="With --older-than: only this experiment's runs.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def runs_rm(run_ids: tuple[str, ...], older_than: float | None, experiment: str | None, dry_run: bool,
            as_json: bool, workspace_name: str | None) -> None:
    """Remove finished runs (row, metrics, folder), then snapshots no run names any more."""
    from ..runs import RunStatus

    if not run_ids and older_than is None:
        raise click.UsageError("name runs to remove, or give --older-than DAYS")
    ws = workspace_named(workspace_name)
    doomed: list[str] = []
    for run_id in run_ids:
        run = ws.get_run(run_id)  # an unknown id fails before anything is removed
        if run.get_status() in (RunStatus.QUEUED, RunStatus.RUNNING):
            raise click.UsageError(f"run {run_id} has not finished; cancel it first (dockyard runs cancel {run_id})")
        doomed.append(run_id)
    if older_than is not None:
        cutoff = time.time() - older_than * 86400
        for run in ws.get_runs(experiment=experiment, limit=_EVERY_RUN,
                               statuses=(RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELED)):
            ended = run.to_json(metrics=False)["ended"]
            if ended is not None and ended < cutoff and run.id not in doomed:
                doomed.append(run.id)
    if not dry_run:
        for run_id in doomed:
            ws.remove_run(run_id)
    snapshots, freed = (0, 0) if dry_run else ws.collect_snapshots()
    if as_json:
        emit_json({"dry_run": dry_run, "removed": doomed, "snapshots_removed": snapshots, "freed_bytes": freed})
        return
    verb = "would remove" if dry_run else "removed"
    for run_id in doomed:
        click.echo(f"{verb} {run_id}")
    click.echo(f"{verb} {len(doomed)} run(s)" + ("" if dry_run else
               f"; {snapshots} unused snapshot(s), {freed / 1e6:.1f} MB"))


@runs.command("compare")
@click.argument("run_ids", nargs=-1, required=True, shell_complete=_complete_run_ids)
@click.option("--metric", default=None, help="Only this metric (with --plot: the one drawn).")
@click.option("--plot", default=None, metavar="FILE", help="Draw the metric's series of every run into one PNG.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def runs_compare(run_ids: tuple[str, ...], metric: str | None, plot: str | None, as_json: bool,
                 workspace_name: str | None) -> None:
    """Metrics of several runs side by side: the last value of each (and how many were logged)."""
    runs_ = [run_by_id(run_id, workspace_name) for run_id in run_ids]
    metrics = {run.id: run.to_json()["metrics"] for run in runs_}
    names = sorted({n for m in metrics.values() for n in m if metric is None or n == metric})
    if metric is not None and not names:
        raise click.UsageError(f"no run among these logged {metric!r}")
    if as_json:
        emit_json({"runs": list(metrics), "metrics": {n: {rid: metrics[rid].get(n) for rid in metrics} for n in names}})
    else:
        def cell(values: list[Any] | None) -> str:
            if not values:
                return "-"
            last = fmt(values[-1]) if not isinstance(values[-1], (dict, list)) else "(table)"
            return last if len(values) == 1 else f"{last} ({len(values)})"

        header = ("METRIC", *(r.id for r in runs_))
        rows = [(n, *(cell(metrics[r.id].get(n)) for r in runs_)) for n in names]
        widths = [max(len(row[i]) for row in (header, *rows)) for i in range(len(header))]
        for row in (header, *rows):
            click.echo("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    if plot:
        if metric is None and len(names) != 1:
            raise click.UsageError("--plot draws one metric across runs: give --metric NAME")
        from ._terminal import plot_runs

        name = metric or names[0]
        plot_runs({rid: metrics[rid].get(name) or [] for rid in metrics}, plot, title=name)
        if not as_json:
            click.echo(f"plot written to {plot}")


@click.command("gpus")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def gpus_command(as_json: bool, workspace_name: str | None) -> None:
    """The machine's GPUs (or declared virtual ones), who holds each, and the one queue of runs
    (every workspace's) waiting for them."""
    from ..compute import gpu_status, wake_agent

    home = workspace_named(workspace_name).home
    wake_agent(home)  # runs waiting for GPUs need someone awake to start them
    status = gpu_status(home)
    doc: dict[str, Any] = status.to_json()
    if as_json:
        emit_json(doc)
        return
    if not status.discovery.gpus:
        click.echo(f"no GPUs: {status.discovery.reason}")
        click.echo("(for development, declare virtual ones: DOCKYARD_GPUS=4 dockyard gpus)")
    for g in doc["gpus"]:
        tag = " (virtual)" if g["virtual"] else ""
        holder = g["holder"] or "free"
        click.echo(f"{g['index']:>2}  {g['uuid']:<42} {g['name']}{tag}  {g['memory_mib']} MiB  {holder}")
    for position, q in enumerate(doc["queue"], start=1):
        click.echo(f"waiting #{position}: {q['run']} ({q['workspace']}) needs {q['gpus']} GPU(s): {q['reason']}")


@click.group()
def agent() -> None:
    """The machine's background agent that starts and follows runs (started automatically on submit)."""


@agent.command("start")
@_WORKSPACE
def agent_start(workspace_name: str | None) -> None:
    """Start the agent unless it runs (one per dockyard home, for every workspace)."""
    from ..compute import ensure_agent

    status = ensure_agent(workspace_named(workspace_name).home)
    if not status.running:
        raise DockyardError("the agent did not start", hint=f"read {status.log}")
    click.echo(f"agent running (pid {status.pid}); log: {status.log}")


@agent.command("stop")
@_WORKSPACE
def agent_stop(workspace_name: str | None) -> None:
    """Stop the agent; running runs go on and the next agent adopts them."""
    from ..compute import stop_agent

    click.echo("agent stopped" if stop_agent(workspace_named(workspace_name).home) else "no agent was running")


@agent.command("status")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_WORKSPACE
def agent_status_command(as_json: bool, workspace_name: str | None) -> None:
    """Whether the agent runs, its pid and log."""
    from ..compute import agent_status

    status = agent_status(workspace_named(workspace_name).home)
    if as_json:
        emit_json(status.to_json())
    else:
        state = f"running (pid {status.pid})" if status.running else "not running"
        click.echo(f"agent {state}; log: {status.log}")
