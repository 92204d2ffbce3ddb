"""``dockyard doctor``, ``base``, ``env`` and ``cache``: the machine, base images, environments, the index."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import click

from ..errors import DockyardError
from ._terminal import emit_json, progress_lines

if TYPE_CHECKING:  # pragma: no cover
    from ..build import CacheRegistry

__all__ = ["base", "cache", "doctor", "env"]


@click.command()
@click.option("--compute", "compute_name", default=None, metavar="NAME",
              help="Check the attached cluster NAME instead: reachable, and each node's dockyard, engine, BuildKit, GPUs.")
@click.option("--workspace", "workspace_name", default=None, metavar="NAME",
              help="The workspace of --compute (default: from config.json, else 'default').")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def doctor(compute_name: str | None, workspace_name: str | None, as_json: bool) -> None:
    """Check the engine, BuildKit, every database (index, GPU leases, run stores), GPUs and base images;
    say how to fix what is missing."""
    from .._doctor import DoctorReport, check_compute, run_doctor

    if compute_name:
        from ._common import workspace_named

        record = workspace_named(workspace_name).store.compute(compute_name)
        if record is None or record.kind != "ray":
            raise click.UsageError(f"{compute_name!r} is not an attached cluster of this workspace; "
                                   "see `dockyard compute ls`")
        report = DoctorReport(check_compute(record.settings, compute_name))
    else:
        report = run_doctor()
    if as_json:
        emit_json(report.to_json())
    else:
        width = max([12, *(len(check.name) for check in report.checks)])
        for check in report.checks:
            mark = "ok " if check.ok else ("FAIL" if check.required else "warn")
            click.echo(f"[{mark:<4}] {check.name:<{width}} {check.detail}")
        click.echo("healthy" if report.ok else "not healthy: fix the FAIL lines above")
    if not report.ok:
        sys.exit(3)


@click.group()
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
    from ..build import HOST_CA_BUNDLE, bootstrap

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
    from ..build import list_base_images

    images = list_base_images()
    if as_json:
        emit_json({"images": [i.to_json() for i in images]})
        return
    if not images:
        click.echo("no base images; make one with `dockyard base bootstrap`")
    for i in images:
        click.echo(f"{i.ref:<36} {i.flavor:<8} {i.suite:<10} {i.created}")


@click.group()
def env() -> None:
    """Environment specs: content keys and what makes two specs differ."""


_ENV_FILE = click.Path(dir_okay=False, path_type=str)


def _image_key(environment, *, quiet: bool = False):  # type: ignore[no-untyped-def]
    """(the key that names the environment's image, why it could not be resolved or None).

    Every `env` command shows this key, the one `env build` tags, so `cache pin $(dockyard env key
    F)` names the built image. Where the base cannot be resolved (no engine, base not pulled yet)
    the key before resolution is shown, and stderr says so.
    """
    from ..build import Builder

    builder = Builder()
    try:
        key, why = builder.image_key(environment)
    finally:
        builder.close()
    if why and not quiet:
        click.echo(f"note: base not resolved: {why}; showing the key before resolution "
                   f"(`dockyard cache pin` and `cache ls` accept it too)", err=True)
    return key, why


@env.command("key")
@click.argument("file", type=_ENV_FILE)
@click.option("--explain", is_flag=True, help="Show each part's own hash, to see why a cache missed.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_key(file: str, explain: bool, as_json: bool) -> None:
    """Print the key that names the image of the environment in FILE (the one `env build` tags).

    The base image's digest is part of it; with no engine to ask, the key before resolution is
    printed and stderr says so."""
    from .. import Environment
    from .._explain import changed_since_last_build, describe_parts

    environment = Environment.load(file)
    key, why = _image_key(environment, quiet=as_json)
    if as_json:
        emit_json({**key.to_json(), "resolved": why is None, "note": why})
        return
    click.echo(key.hex)
    if explain:
        click.echo(f"schema {key.schema}; parts:")
        for name, digest, summary in describe_parts(environment, key):
            click.echo(f"  {name:<13} {digest}  {summary}")
        changed = changed_since_last_build(file, key)
        if changed is not None:
            click.echo(f"since the last build of this file: {changed}")


@env.command("diff")
@click.argument("a", type=_ENV_FILE)
@click.argument("b", type=_ENV_FILE)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_diff(a: str, b: str, as_json: bool) -> None:
    """Name the key parts in which environments A and B differ (exit 1 when they differ, like diff)."""
    from dockyard.cache import diff_keys

    from .. import Environment
    from .._explain import field_of_part

    (key_a, _), (key_b, _) = _image_key(Environment.load(a), quiet=as_json), _image_key(Environment.load(b), quiet=True)
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
    from .. import Environment
    from ..build import installer_setting, render_dockerfile

    environment = Environment.load(file)
    inputs = environment.build_inputs()
    key, _ = _image_key(environment)
    # A clean build's Dockerfile (a near miss starts from a neighbour's image instead, see README).
    rendered = render_dockerfile(environment, key, inputs=inputs, installer=installer_setting())
    click.echo(rendered.dockerfile, nl=False)
    for name, (data, _mode) in sorted(rendered.spec.flat().items()):
        if isinstance(data, bytes) and not name.startswith(("files/", "channels/")):
            click.echo(f"# --- dependency file {name} ({len(data)} bytes) ---")
            click.echo(data.decode(errors="replace"), nl=False)
        else:
            click.echo(f"# --- dependency file {name}: {data} ---")
    if rendered.user_context is not None:
        ctx = rendered.user_context
        files = sum(1 for e in ctx.entries if e.kind == "f")
        click.echo(f"# --- build context {ctx.root}: {files} files, {ctx.size} bytes (digest {ctx.digest}) ---")


_CACHE_REGISTRY = click.option(
    "--cache-registry", default=None, metavar="REG/REPO",
    help="Shared cache in a registry (default: DOCKYARD_CACHE_REGISTRY, else the workspace config's "
    "cache_registry; '' turns it off): pull a key built elsewhere, push what is built.")


def _shared_cache(flag: str | None) -> CacheRegistry | None:
    """``--cache-registry``, else ``DOCKYARD_CACHE_REGISTRY``, else the config.json above the
    current folder (a broken config is an error, not "no shared cache")."""
    from .. import Workspace
    from ..build import resolve_cache_registry

    if flag is None and not os.environ.get("DOCKYARD_CACHE_REGISTRY", "").strip():
        found = Workspace.find()
        return found.cache_registry if found is not None else None
    return resolve_cache_registry(flag, None)


@env.command("build")
@click.argument("file", type=_ENV_FILE)
@click.option("--no-cache", is_flag=True, help="Rebuild from scratch and replace the cached image.")
@click.option("--progress", "progress_mode", type=click.Choice(["auto", "tty", "plain", "json"]), default="auto",
              show_default=True, help="How to show build progress (on stderr).")
@_CACHE_REGISTRY
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_build(file: str, no_cache: bool, progress_mode: str, cache_registry: str | None, as_json: bool) -> None:
    """Build the environment in FILE once; later calls are cache hits in milliseconds."""
    from .. import Environment
    from ..build import Builder
    from ._terminal import BuildProgress

    environment = Environment.load(file)
    builder = Builder(cache_registry=_shared_cache(cache_registry) or "")
    try:
        # The view draws nothing until the first event: a cache hit never loads rich or grpc.
        with BuildProgress(progress_mode, f"building {environment.name}") as view:
            image = builder.ensure_image(environment, no_cache=no_cache, progress=view.note, on_event=view.event)
    finally:
        builder.close()  # waits for the push to the shared cache, if one is under way
    failed = builder.published.get(image.key)
    pushed = image.key in builder.published and failed is None
    if as_json:
        doc = image.to_json()
        if builder.shared is not None:
            doc["shared_cache"] = {"registry": str(builder.shared), "pushed": pushed, "push_error": failed}
        emit_json(doc)
        return
    if image.cached:
        click.echo(f"{image.image} (cache hit in {image.seconds * 1000:.1f} ms)")
    elif image.source == "pulled" and builder.shared is not None and not builder.published:
        click.echo(f"{image.image} pulled from the shared cache {builder.shared} in {image.seconds:.1f}s")
    else:
        click.echo(f"{image.image} built in {image.seconds:.1f}s ({image.image_id[:19]})")
    if pushed:
        click.echo(f"pushed to the shared cache as {builder.shared.ref(image.key)}")  # type: ignore[union-attr]
    elif failed:
        click.echo(f"warning: not pushed to the shared cache: {failed}", err=True)


@env.command("push")
@click.argument("file", type=_ENV_FILE)
@_CACHE_REGISTRY
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_push(file: str, cache_registry: str | None, as_json: bool) -> None:
    """Push the built image of the environment in FILE to the shared cache (REG/REPO:<key>)."""
    from .. import Environment
    from ..build import Builder

    environment = Environment.load(file)
    builder = Builder(cache_registry=_shared_cache(cache_registry) or "")
    try:
        key, why = builder.image_key(environment)
        entry = builder.cache.find(key) if why is None else None
        if entry is None:
            raise click.UsageError(f"{file} is not built here (key {key.hex}); build it first: dockyard env build {file}")
        digest = builder.publish(entry.key, entry.image)
        remote = builder.shared.ref(entry.key)  # type: ignore[union-attr]
    finally:
        builder.close()
    if as_json:
        emit_json({"key": entry.key, "image": entry.image, "pushed": remote, "digest": digest})
    else:
        click.echo(f"pushed {entry.image} as {remote} ({digest[:19]})")


@env.command("ls")
@click.option("--workspace", "workspace_name", default=None, metavar="NAME",
              help="Whose registered environments to show (default: from config.json, else 'default').")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def env_ls(workspace_name: str | None, as_json: bool) -> None:
    """List the workspace's registered environments (name, version, key, built?) and the
    environment images in the index (most recently used first)."""
    from ..build import Builder
    from ._common import workspace_named

    ws = workspace_named(workspace_name)
    index = _open_cache()
    builder = Builder(ws.home)
    registered = []
    try:
        for name, version, _created in ws.environment_registry.versions():
            env = ws.environment_registry.get(name, version)
            try:
                key, why = builder.image_key(env)
                built = index.find(key) if why is None else index.find(key.hex)
                registered.append({"name": name, "version": str(version), "key": key.hex,
                                   "image": built.image if built else None, "note": why})
            except DockyardError as exc:  # a registered spec whose files moved: say so, list the rest
                registered.append({"name": name, "version": str(version), "key": None, "image": None,
                                   "note": exc.message})
    finally:
        builder.close()
        index.close()
    if as_json:
        images = _entries()
        emit_json({"workspace": ws.name, "registered": registered, "images": [e.to_json() for e in images]})
        return
    if registered:
        click.echo(f"registered in workspace {ws.name}:")
        click.echo(f"  {'NAME':<24} {'VERSION':>7}  {'KEY':<32}  IMAGE")
        for r in registered:
            image = r["image"] or ("not built" if r["key"] else f"error: {r['note']}")
            click.echo(f"  {r['name']:<24} {r['version']:>7}  {r['key'] or '-':<32}  {image}")
        click.echo("images:")
    _list_entries(False)


@click.group()
def cache() -> None:
    """The image index: what is cached, how much it holds, and clearing space."""


def _open_cache():  # type: ignore[no-untyped-def]
    from dockyard.cache import ImageCache

    from .._home import index_path

    return ImageCache(index_path())


def _entries():  # type: ignore[no-untyped-def]
    index = _open_cache()
    try:
        return sorted(index.entries(), key=lambda e: e.last_used, reverse=True)
    finally:
        index.close()


def _list_entries(as_json: bool) -> None:
    from ..build import image_names

    entries = _entries()
    names = image_names() if entries else {}
    if as_json:
        emit_json({"images": [{**e.to_json(), "name": names.get(e.image)} for e in entries]})
        return
    if not entries:
        click.echo("no environment images yet; build one with `dockyard env build FILE`")
        return
    width = max([4, *(len(names.get(e.image, "-")) for e in entries)])
    click.echo(f"{'KEY':<32}  {'NAME':<{width}}  {'SIZE':>11}  {'HITS':>5}")
    for e in entries:
        pin = "  pinned" if e.pinned else ""
        click.echo(f"{e.key}  {names.get(e.image, '-'):<{width}}  {e.size / 1e6:8.1f} MB  {e.hit_count:>5}{pin}")


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


#: The policy ``cache gc --dry-run`` shows when no limit is given.
_DEFAULT_GC_DAYS = 30.0


@cache.command("prune-build-cache")
@click.option("--keep-bytes", default=None, metavar="SIZE", help="Keep this much of BuildKit's cache (e.g. 10G).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_prune_build_cache(keep_bytes: str | None, as_json: bool) -> None:
    """Free BuildKit's own build cache (layers of past steps; built images stay). The next
    build of a new environment reruns its steps; cache hits are not affected."""
    from ..build import parse_size, prune_build_cache

    freed = prune_build_cache(keep_bytes=parse_size(keep_bytes) if keep_bytes else 0)
    if as_json:
        emit_json({"freed_bytes": freed})
    else:
        click.echo(f"freed {freed / 1e6:.1f} MB of BuildKit's build cache")


@cache.command("gc")
@click.option("--keep-bytes", default=None, metavar="SIZE", help="Shrink to at most SIZE (e.g. 20G, 500MiB).")
@click.option("--keep-days", type=float, default=None, help="Drop images unused for more than N days.")
@click.option("--dry-run", is_flag=True, help="Say what would be removed; change nothing.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_gc(keep_bytes: str | None, keep_days: float | None, dry_run: bool, as_json: bool) -> None:
    """Remove least-recently-used images (never pinned ones, never ones a container uses).

    With --dry-run and no limit, shows what the default policy (--keep-days 30) would remove."""
    from ..build import collect_build_inputs, collect_garbage, parse_size

    if keep_bytes is None and keep_days is None:
        if not dry_run:
            raise click.UsageError("give --keep-bytes SIZE and/or --keep-days N "
                                   f"(--dry-run alone shows what --keep-days {_DEFAULT_GC_DAYS:g} would remove)")
        keep_days = _DEFAULT_GC_DAYS
        if not as_json:
            click.echo(f"default policy: --keep-days {_DEFAULT_GC_DAYS:g}")
    limit = parse_size(keep_bytes) if keep_bytes is not None else None
    report = collect_garbage(keep_bytes=limit, keep_days=keep_days, dry_run=dry_run)
    inputs = collect_build_inputs(keep_days=keep_days, dry_run=dry_run)
    if as_json:
        emit_json({**report.to_json(), "build_inputs": inputs})
        return
    verb = "would remove" if dry_run else "removed"
    for entry in report.removed:
        click.echo(f"{verb} {entry.image} ({entry.size / 1e6:.1f} MB)")
    for item in inputs:
        click.echo(f"{verb} {item['image']} ({int(item['size']) / 1e6:.1f} MB, {item['why']})")
    for failure in report.errors:
        click.echo(f"kept {failure.image}: {failure.error}", err=True)
    click.echo(f"{verb} {len(report.removed)} image(s), {report.freed_bytes / 1e6:.1f} MB; "
               f"{report.kept} left ({report.remaining_bytes / 1e6:.1f} MB)")


def _set_pin(key: str, pinned: bool) -> None:
    from dockyard.cache import ContentKey

    index = _open_cache()
    try:
        # Either form names the image: its key, or the key its spec has before base resolution.
        entry = index.find(ContentKey.parse(key))
        found = entry is not None and (index.pin(entry.key) if pinned else index.unpin(entry.key))
    finally:
        index.close()
    if not found or entry is None:
        raise click.UsageError(f"no cached image with key {key}; see `dockyard cache ls`")
    via = "" if entry.key == key.strip().lower() else f" (key {entry.key}, its spec's key before base resolution)"
    click.echo(f"{'pinned' if pinned else 'unpinned'} {entry.image}{via}")


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


def _ago(at: float) -> str:
    import time

    seconds = max(0.0, time.time() - at)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


@cache.command("status")
@_CACHE_REGISTRY
@click.option("--no-check", is_flag=True, help="Do not ask the registry (show only how the last pushes ended).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_status(cache_registry: str | None, no_check: bool, as_json: bool) -> None:
    """Each local image against the shared cache: in the registry now (one HEAD each), and how its
    last push from here ended; a failed push is retried with `dockyard cache push --failed`."""
    from ..build import Builder

    builder = Builder(cache_registry=_shared_cache(cache_registry) or "")
    try:
        found = builder.shared_status(check=not no_check)
        registry = str(builder.shared)
    finally:
        builder.close()
    failed = [s for s in found if s.last_push is not None and not s.last_push.ok]
    if as_json:
        emit_json({"registry": registry, "entries": [s.to_json() for s in found], "failed_pushes": len(failed)})
        return
    click.echo(f"shared cache  {registry}")
    if not found:
        click.echo("no environment images yet; build one with `dockyard env build FILE`")
        return
    click.echo(f"{'KEY':<32}  {'IN REGISTRY':<11}  LAST PUSH FROM HERE")
    for s in found:
        if s.last_push is None:
            last = "-"
        elif s.last_push.ok:
            last = f"pushed {_ago(s.last_push.at)} ({s.last_push.detail[:19]})"
        else:
            last = f"FAILED {_ago(s.last_push.at)}: {s.last_push.detail}"
        where = s.in_registry + (f" ({s.why})" if s.why else "")
        click.echo(f"{s.key}  {where:<11}  {last}")
    if failed:
        click.echo(f"{len(failed)} push(es) failed; retry them with `dockyard cache push --failed`", err=True)


@cache.command("push")
@click.argument("keys", nargs=-1)
@click.option("--failed", is_flag=True, help="Push again every image whose last push failed.")
@_CACHE_REGISTRY
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def cache_push(keys: tuple[str, ...], failed: bool, cache_registry: str | None, as_json: bool) -> None:
    """Push local images (by KEY, or --failed) to the shared cache as REG/REPO:<key>."""
    from ..build import Builder

    builder = Builder(cache_registry=_shared_cache(cache_registry) or "")
    try:
        results = builder.republish(list(keys), failed=failed)
        registry = builder.shared
    finally:
        builder.close()
    assert registry is not None
    if as_json:
        emit_json({"registry": str(registry), "pushed": [
            {"key": k, "ref": registry.ref(k), "digest": d, "error": e or None} for k, d, e in results]})
    else:
        if not results:
            click.echo("nothing to push: no failed push is recorded")
        for key, digest, error in results:
            if digest:
                click.echo(f"pushed {registry.ref(key)} ({digest[:19]})")
            else:
                click.echo(f"failed {registry.ref(key)}: {error}", err=True)
    if any(d is None for _, d, _e in results):
        sys.exit(1)
