import pytest
from dockyard.build import spec_fingerprint
from dockyard.cli._fastpath import _parse


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["env", "build", "e.yml"], ("e.yml", False)),
        (["env", "build", "e.yml", "--json"], ("e.yml", True)),
        (["env", "build", "--progress", "plain", "e.yml"], ("e.yml", False)),
        (["env", "build", "e.yml", "--progress=json", "--json"], ("e.yml", True)),
        (["env", "build", "e.yml", "--no-cache"], None),
        (["env", "build", "--help"], None),
        (["env", "build"], None),
        (["env", "build", "a.yml", "b.yml"], None),
        (["--debug", "env", "build", "e.yml"], None),
        (["env", "key", "e.yml"], None),
    ],
)
def test_only_plain_env_build_takes_the_fast_lane(args, expected):
    assert _parse(args) == expected


def test_fingerprint_depends_on_bytes_and_engine():
    a = spec_fingerprint(b"name: x\n", "unix:///var/run/docker.sock")
    assert a == spec_fingerprint(b"name: x\n", "unix:///var/run/docker.sock")
    assert a != spec_fingerprint(b"name: y\n", "unix:///var/run/docker.sock")
    assert a != spec_fingerprint(b"name: x\n", "unix:///other.sock")
