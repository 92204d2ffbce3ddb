"""Real-engine helpers for integration tests: run containers, and clean up what a test made."""

from __future__ import annotations

from dataclasses import dataclass, field

from dockyard.dockerd import EngineClient


@dataclass
class EngineResources:
    prefix: str
    images: list[str] = field(default_factory=list)
    containers: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.client = EngineClient.from_env().docker_client()

    def run(self, image: str, command: list[str], **kwargs: object) -> tuple[int, str]:
        """Run a container to completion; return (exit code, combined output). Always removed."""
        container = self.client.containers.run(image, command, detach=True, **kwargs)
        self.containers.append(container.id)
        result = container.wait(timeout=300)
        output = container.logs(stdout=True, stderr=True).decode(errors="replace")
        return int(result["StatusCode"]), output

    def track_image(self, ref: str) -> str:
        self.images.append(ref)
        return ref

    def cleanup(self) -> None:
        import docker.errors

        for cid in self.containers:
            try:
                self.client.containers.get(cid).remove(force=True)
            except docker.errors.NotFound:
                pass
        for ref in self.images:
            try:
                self.client.images.remove(ref, force=True)
            except docker.errors.NotFound:
                pass
        self.client.close()
