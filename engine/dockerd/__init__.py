"""``dockyard.dockerd``: talking to a Docker Engine.

``EngineClient`` is the engine's address plus every request dockyard makes to it (one-request
HTTP, the ``/grpc`` hijack for BuildKit, docker-py for the long-lived agent); ``unix_image_id`` is
the one raw request a CLI cache hit needs. Imports only ``dockyard.errors``.
"""

from .._lazy import lazy_exports

TYPE_CHECKING = False

_EXPORTS = {
    "API_VERSION": "._client",
    "EngineClient": "._client",
    "EngineInfo": "._client",
    "HttpReply": "._client",
    "translate_docker_error": "._client",
    "unix_image_id": "._rawhttp",
}
__all__ = sorted(_EXPORTS)
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from ._client import API_VERSION, EngineClient, EngineInfo, HttpReply, translate_docker_error
    from ._rawhttp import unix_image_id
