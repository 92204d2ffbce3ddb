"""``dockyard.build``: "give me the image for this environment".

Content keys and the index come from ``dockyard.cache``; this room renders the Dockerfile, drives
BuildKit over gRPC, pulls and pushes through registries, makes base images without a registry,
removes least-recently-used images, and keeps the spec memo that the CLI's fast lane reads. It
may import ``dockyard.cache``, ``dockyard.proto``, ``dockyard.dockerd``, the environment model and
the errors; never ``runs``, ``gpu``, ``launch``, ``compute`` or the CLI (import-linter checks it).
"""

from .._lazy import lazy_exports

TYPE_CHECKING = False

_EXPORTS = {
    # building environments
    "Builder": "._builder",
    "BuiltImage": "._builder",
    "SharedStatus": "._builder",
    "ensure_image": "._builder",
    "RenderedBuild": "._dockerfile",
    "image_tag": "._dockerfile",
    "render_dockerfile": "._dockerfile",
    "BuildEvent": "._buildkit",
    "BuildKitClient": "._buildkit",
    "SolveSpec": "._buildkit",
    "Worker": "._buildkit",
    # registries
    "ImageName": "._registry",
    "login_check": "._registry",
    "parse_image_ref": "._registry",
    "pull_image": "._registry",
    "push_image": "._registry",
    "qualify": "._registry",
    # the shared cache in a registry
    "CacheRegistry": "._shared",
    "Presence": "._shared",
    "nearest_key": "._shared",
    "resolve_cache_registry": "._shared",
    # base images made without a registry
    "BaseImage": "._base_images",
    "HOST_CA_BUNDLE": "._base_images",
    "base_image_ref": "._base_images",
    "bootstrap": "._base_images",
    "list_base_images": "._base_images",
    # image GC
    "collect_garbage": "._image_gc",
    "collect_build_inputs": "._image_gc",
    "prune_build_cache": "._image_gc",
    "image_names": "._image_gc",
    "parse_size": "._image_gc",
    # recorded resolutions and locks
    "installer_setting": "._resolved",
    "lock_environment": "._resolved",
    "show_environment": "._resolved",
    # the CLI fast lane's memo
    "spec_fingerprint": "._memo",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ._base_images import HOST_CA_BUNDLE, BaseImage, base_image_ref, bootstrap, list_base_images
    from ._builder import Builder, BuiltImage, SharedStatus, ensure_image
    from ._buildkit import BuildEvent, BuildKitClient, SolveSpec, Worker
    from ._dockerfile import RenderedBuild, image_tag, render_dockerfile
    from ._image_gc import collect_build_inputs, collect_garbage, image_names, parse_size, prune_build_cache
    from ._memo import spec_fingerprint
    from ._registry import ImageName, login_check, parse_image_ref, pull_image, push_image, qualify
    from ._resolved import installer_setting, lock_environment, show_environment
    from ._shared import CacheRegistry, Presence, nearest_key, resolve_cache_registry
