"""The ``dockyard`` command: parse, call one library function, render. Errors are mapped in one place."""

from __future__ import annotations

import os
import sys
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


@cache.command("pin")
@click.argument("key")
def cache_pin(key: str) -> None:
    """Keep the image of KEY through every GC."""
    index = _open_cache()
    try:
        found = index.pin(key)
    finally:
        index.close()
    if not found:
        raise click.UsageError(f"no cached image with key {key}; see `dockyard cache ls`")
    click.echo(f"pinned {key}")


@cache.command("unpin")
@click.argument("key")
def cache_unpin(key: str) -> None:
    """Let GC remove the image of KEY again."""
    index = _open_cache()
    try:
        found = index.unpin(key)
    finally:
        index.close()
    if not found:
        raise click.UsageError(f"no cached image with key {key}; see `dockyard cache ls`")
    click.echo(f"unpinned {key}")


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
