"""Golden content keys: pinned literal hex for representative environments.

ANY change to these values means every cache in the field misses (or, worse, two meanings share a
key). If a canonicalisation change is intended, bump ``SCHEMA_VERSION`` in ``cache/_keys.py``,
document the new rule there, and only then update the hex below.
"""

from __future__ import annotations

import pytest
from dockyard.cache import SCHEMA_VERSION, KeyParts, compute_key
from xxhash import xxh3_128_hexdigest

PY = "dockyard/base:bookworm-python3"

CASES: dict[str, tuple[KeyParts, str]] = {
    "busybox_only": (KeyParts("busybox:1.36"), "4ad0a528aa5bc83622160a40289aa68a"),
    "python_pip": (
        KeyParts(PY, pip=["numpy==2.1.0", "scikit-learn>=1.5"]),
        "dc127207f283bf72087eb3cd5e233324",
    ),
    "conda_with_pip": (
        KeyParts(
            PY,
            conda={
                "name": "project_environment",
                "channels": ["conda-forge", "defaults"],
                "dependencies": [
                    "python=3.11", "pip", "numpy=1.26",
                    {"pip": ["azureml-defaults", "torch==2.3.0"]},
                ],
            },
        ),
        "9bcf685fdc3cb3a7881e66a85f4c7218",
    ),
    "dockerfile": (
        KeyParts(
            None,
            dockerfile=f"FROM {PY}\nRUN pip install --no-cache-dir numpy==2.1.0\nWORKDIR /app\n",
        ),
        "aff9337e539a3e18ee93b35e3b0f09c9",
    ),
    "user_managed": (
        KeyParts("fastdotai/fastai2:latest", user_managed=True),
        "fdea0fedff389ab643c8f86e93c6bd1c",
    ),
    "with_digest": (
        KeyParts("busybox:1.36", base_digest="sha256:" + "0123456789abcdef" * 4),
        "0fcaa45ee2960d2f53b95486188e546e",
    ),
    "with_build_args": (
        KeyParts(PY, build_args={"PYTHON_VERSION": "3.11", "CUDA": "12.4"}),
        "5bf835ff39dd12efce68d0f1f4f918bd",
    ),
    "with_registry": (
        KeyParts("team/base:1.0", registry="localhost:5000"),
        "05c66390aeb38664457927d5a656bc1d",
    ),
    "arm64": (KeyParts(PY, platform="linux/arm64"), "c7c937c065d620b9382d18bb17107f5b"),
    "pip_index_url": (
        KeyParts(PY, pip=["--index-url https://pypi.internal.example/simple", "numpy==2.1.0",
                          "requests"]),
        "8f1b677206483e9f1d1de393e1106583",
    ),
}


def test_schema_version_is_the_one_these_keys_were_pinned_with() -> None:
    assert SCHEMA_VERSION == 1, "a new schema needs new golden keys (and this number bumped)"


@pytest.mark.parametrize("name", sorted(CASES))
def test_golden_key(name: str) -> None:
    parts, expected = CASES[name]
    assert compute_key(parts).hex == expected


def test_golden_keys_are_all_distinct() -> None:
    assert len({hex_ for _, hex_ in CASES.values()}) == len(CASES)


def test_the_documented_algorithm_reproduces_a_golden_key() -> None:
    """Recompute ``busybox_only`` from the rules in the ``_keys`` docstring, independently."""

    def h(payload: str) -> str:
        return xxh3_128_hexdigest(payload.encode())

    payloads = {
        "base_digest": "-",
        "base_image": "+busybox:1.36",
        "build_args": "",
        "conda": "-",
        "dockerfile": "-",
        "pip": "o\n\x00r\n",
        "platform": "linux/amd64",
        "registry": "-",
        "user_managed": "0",
    }
    body = "dockyard-cache-key/v1\n" + "".join(f"{n}={h(p)}\n" for n, p in sorted(payloads.items()))
    key = compute_key(CASES["busybox_only"][0])
    assert dict(key.parts) == {n: h(p) for n, p in payloads.items()}
    assert h(body) == key.hex == CASES["busybox_only"][1]


# -- the optional `context` part ---------------------------------------------------------------------

_CTX_DOCKERFILE = f"FROM {PY}\nCOPY hello.txt /hello.txt\n"


def test_a_dockerfile_without_a_context_keeps_its_golden_key() -> None:
    parts = KeyParts(None, dockerfile=_CTX_DOCKERFILE)
    assert "context" not in compute_key(parts).parts
    assert compute_key(KeyParts(None, dockerfile=_CTX_DOCKERFILE, context=None)) == compute_key(parts)


def test_context_key_is_pinned_and_appends_one_line() -> None:
    digest = "0123456789abcdef0123456789abcdef"
    key = compute_key(KeyParts(None, dockerfile=_CTX_DOCKERFILE, context=digest))
    without = compute_key(KeyParts(None, dockerfile=_CTX_DOCKERFILE))
    assert key.hex != without.hex
    assert set(key.parts) == {*without.parts, "context"}
    assert {n: key.parts[n] for n in without.parts} == dict(without.parts)
    # The documented rule: the fixed body, then one `context=<hash>` line.
    body = f"dockyard-cache-key/v{SCHEMA_VERSION}\n" + "".join(
        f"{n}={without.parts[n]}\n" for n in sorted(without.parts)
    ) + f"context={xxh3_128_hexdigest(('+' + digest).encode())}\n"
    assert key.hex == xxh3_128_hexdigest(body.encode())
    assert key.hex == "3b675e94431a75039ce460e34d6a991a"


# -- the optional `lock` part (`dockyard env lock`) and the installer, which is not a part -------------

_PINS = ["numpy==2.1.0", "scikit-learn==1.5.2", "scipy==1.14.1", "joblib==1.4.2", "threadpoolctl==3.5.0"]


def test_a_lock_is_pinned_and_appends_one_line_after_the_fixed_ones() -> None:
    without = compute_key(CASES["python_pip"][0])
    key = compute_key(KeyParts(PY, pip=["numpy==2.1.0", "scikit-learn>=1.5"], lock=list(reversed(_PINS))))
    assert set(key.parts) == {*without.parts, "lock"}
    assert {n: key.parts[n] for n in without.parts} == dict(without.parts), "only the lock part is added"
    # Canonicalised like pip requirements: order of the pins does not matter.
    assert key.parts["lock"] == xxh3_128_hexdigest(("+o\n\x00r\n" + "\n".join(sorted(_PINS))).encode())
    body = f"dockyard-cache-key/v{SCHEMA_VERSION}\n" + "".join(
        f"{n}={without.parts[n]}\n" for n in sorted(without.parts)
    ) + f"lock={key.parts['lock']}\n"
    assert key.hex == xxh3_128_hexdigest(body.encode()) == "b771c468fd1b02d2f4aa859a0368403d"


def test_context_and_lock_together_come_in_that_order() -> None:
    parts = KeyParts(None, dockerfile=_CTX_DOCKERFILE, context="0123456789abcdef0123456789abcdef", pip=["six"],
                     lock=["six==1.17.0"])
    key = compute_key(parts)
    assert list(key.parts)[-2:] == ["context", "lock"]
    assert key.hex == "9645e585e3ae634f033a9ea1c6dc2cf3"


def test_the_installer_is_not_part_of_the_key(monkeypatch: pytest.MonkeyPatch) -> None:
    """uv and pip install the same resolution into the same layout: images built before uv (by pip)
    keep their keys, and DOCKYARD_INSTALLER=pip builds the same key (the README explains why)."""
    from pathlib import Path

    from dockyard import Environment

    example = Path(__file__).resolve().parents[2] / "examples" / "digits" / "environment.yml"
    keys = set()
    for installer in ("uv", "pip", ""):
        monkeypatch.setenv("DOCKYARD_INSTALLER", installer)
        keys.add(Environment.load(example).content_key().hex)
    assert keys == {"a1685ff5bde7a8f3c00dfee2f3182a72"}, "the digits example's key of before uv"
    assert "installer" not in KeyParts.__dataclass_fields__
