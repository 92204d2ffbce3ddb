"""``dockyard compute``: the workspace's compute targets, and attaching a Ray cluster as one."""

from __future__ import annotations

import click

from ._terminal import emit_json

__all__ = ["compute"]

_WORKSPACE = click.option("--workspace", "workspace_name", default=None, metavar="NAME",
                          help="Workspace (default: from config.json above the current folder, else 'default').")


@click.group()
def compute() -> None:
    """Compute targets: this machine (`local`), AmlCompute-style targets, attached Ray clusters."""


@compute.command("ls")
@_WORKSPACE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compute_ls(workspace_name: str | None, as_json: bool) -> None:
    """List the workspace's compute targets."""
    from ._common import workspace_named

    ws = workspace_named(workspace_name)
    targets = [ws.compute_targets[name] for name in sorted(ws.compute_targets)]
    rows = [{"name": t.name, "kind": t.kind, "max_nodes": t.max_nodes, "address": t.address} for t in targets]
    if as_json:
        emit_json({"workspace": ws.name, "computes": rows})
        return
    click.echo(f"{'NAME':<20} {'KIND':<6} {'MAX':>4}  ADDRESS")
    for row in rows:
        click.echo(f"{row['name']:<20} {row['kind']:<6} {row['max_nodes']:>4}  {row['address'] or '-'}")


@compute.command("attach")
@click.argument("kind", type=click.Choice(["ray"]))
@click.argument("name")
@click.option("--address", required=True, metavar="HOST:PORT",
              help="The cluster's GCS address (this machine is a node of it), or ray://HOST:10001.")
@click.option("--token-file", default=None, metavar="FILE", help="A file holding the cluster's token (RAY_AUTH_MODE=token).")
@click.option("--token-env", default=None, metavar="VARIABLE", help="The NAME of a variable holding the token.")
@click.option("--max-nodes", default=1, show_default=True, type=click.IntRange(min=1),
              help="Runs of this target that execute at once.")
@_WORKSPACE
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
def compute_attach(kind: str, name: str, address: str, token_file: str | None, token_env: str | None, max_nodes: int,
                   workspace_name: str | None, as_json: bool) -> None:
    """Attach an existing cluster as compute target NAME (checked now: reachable, token, nodes)."""
    from ..core.compute import ComputeTarget, RayCompute
    from ._common import workspace_named

    ws = workspace_named(workspace_name)
    config = RayCompute.attach_configuration(address, max_nodes=max_nodes, auth_token_file=token_file,
                                             auth_token_env=token_env)
    target = ComputeTarget.attach(ws, name, config)
    if as_json:
        emit_json({"workspace": ws.name, "name": target.name, "kind": target.kind, "address": target.address,
                   "max_nodes": target.max_nodes})
    else:
        click.echo(f"attached {kind} cluster {target.address} as {target.name!r} in workspace {ws.name!r} "
                   f"(max_nodes={target.max_nodes}); run on it with `dockyard run --compute {target.name} …`")
