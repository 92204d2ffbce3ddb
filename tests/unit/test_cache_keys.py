"""Content keys: canonicalisation rules as properties, validation, the ContentKey value object."""

from __future__ import annotations

import json
import os
import random
import re
import subprocess
import sys
from typing import Any

import pytest
from dockyard.cache import (
    PART_NAMES,
    SCHEMA_VERSION,
    CacheError,
    CacheInputError,
    ContentKey,
    InvalidKey,
    InvalidKeyParts,
    KeyParts,
    compute_key,
    diff_keys,
)
from hypothesis import given
from hypothesis import strategies as st

HEX32 = re.compile(r"[0-9a-f]{32}")

# -- strategies ------------------------------------------------------------------------------

_PKG = st.sampled_from(
    ["numpy", "scipy", "pandas", "torch", "scikit-learn", "requests", "pyyaml", "tqdm", "jax"]
)
_SPEC = st.sampled_from(["", "==1.0", ">=2.1", "<3,>=1.2", "~=1.4", "[extra]>=1"])
_REQ = st.builds(str.__add__, _PKG, _SPEC)
_REQS = st.lists(_REQ, unique=True, max_size=6)
_CONDA_DEP = st.sampled_from(
    ["python=3.11", "pip", "cudatoolkit=11.8", "numpy", "mkl", "libgcc-ng>=12", "r-base 4.3"]
)
_CHANNELS = st.lists(st.sampled_from(["conda-forge", "defaults", "nvidia", "pytorch"]), unique=True,
                     max_size=3)
_DOCKER_LINES = st.lists(
    st.sampled_from(["RUN apt-get update", "ENV A=1", "WORKDIR /app", "COPY <<EOF /x\nhi  \nEOF",
                     "RUN pip install numpy", "USER 1000"]),
    max_size=5,
)
_DIGEST = st.text(alphabet="0123456789abcdef", min_size=64, max_size=64).map(lambda h: "sha256:" + h)
_IMAGES = ["busybox:1.36", "dockyard/base:bookworm-python3", "fastdotai/fastai2:latest",
           "localhost:5000/team/base@sha256:" + "a" * 64]
_PLATFORMS = ["linux/amd64", "linux/arm64", "linux/arm/v7"]
_REGISTRIES = ["localhost:5000", "registry.example.com", "10.0.0.7:5000/team"]
_ARG_VALUE = st.text(alphabet="abcXYZ019._-/: ", max_size=8)


@st.composite
def _conda(draw: st.DrawFn) -> dict[str, Any]:
    deps: list[Any] = list(draw(st.lists(_CONDA_DEP, unique=True, max_size=5)))
    pip = draw(_REQS)
    if pip:
        deps.insert(draw(st.integers(0, len(deps))), {"pip": pip})
    return {"name": draw(st.sampled_from(["env", "train", "x"])), "channels": draw(_CHANNELS),
            "dependencies": deps}


@st.composite
def _kwargs(draw: st.DrawFn) -> dict[str, Any]:
    lines = draw(_DOCKER_LINES)
    return {
        "base_image": draw(st.sampled_from(_IMAGES)),
        "base_digest": draw(st.none() | _DIGEST),
        "dockerfile": draw(st.none() | st.just("FROM scratch\n" + "\n".join(lines))),
        "conda": draw(st.none() | _conda()),
        "pip": draw(_REQS),
        "user_managed": draw(st.booleans()),
        "platform": draw(st.sampled_from(_PLATFORMS)),
        "build_args": draw(st.dictionaries(st.sampled_from(["PY", "CUDA_VERSION", "MODE"]),
                                           _ARG_VALUE, max_size=3)),
        "registry": draw(st.none() | st.sampled_from(_REGISTRIES)),
    }


def _key(**kwargs: Any) -> ContentKey:
    return compute_key(KeyParts(**kwargs))


# -- properties: noise is not a change -------------------------------------------------------


@given(_kwargs(), st.randoms(use_true_random=False))
def test_reordering_and_repeating_set_like_parts_keeps_the_key(
    kw: dict[str, Any], rnd: random.Random
) -> None:
    shuffled = dict(kw)
    pip = list(kw["pip"]) * 2
    rnd.shuffle(pip)
    shuffled["pip"] = pip
    if kw["conda"] is not None:
        deps = [d if isinstance(d, str) else {"pip": rnd.sample(d["pip"], len(d["pip"]))}
                for d in kw["conda"]["dependencies"]]
        deps += [d for d in deps if isinstance(d, str)]
        rnd.shuffle(deps)
        shuffled["conda"] = dict(kw["conda"], dependencies=deps, name="another-name")
    args = list(kw["build_args"].items())
    rnd.shuffle(args)
    shuffled["build_args"] = dict(args)
    assert _key(**shuffled) == _key(**kw)
    assert diff_keys(_key(**shuffled), _key(**kw)) == []


@given(_kwargs(), st.sampled_from(["\r\n", "\r"]), st.sampled_from(["", "\n", "\n\n  \n", "\r\n\r\n"]))
def test_newline_style_whitespace_and_comments_keep_the_key(kw: dict[str, Any], eol: str, tail: str) -> None:
    noisy = dict(kw)
    if kw["dockerfile"] is not None:
        noisy["dockerfile"] = kw["dockerfile"].replace("\n", eol) + tail
    noisy["pip"] = (["# requirements", ""]
                    + [f"  {r}   # pinned by us" for r in kw["pip"]] + ["   ", "#end"])
    if kw["conda"] is not None:
        noisy["conda"] = dict(kw["conda"], dependencies=[
            f"  {' '.join(d.split())}\t" if isinstance(d, str) else d
            for d in kw["conda"]["dependencies"]
        ])
    assert _key(**noisy) == _key(**kw)


# -- properties: a real change is named -------------------------------------------------------


def _mutate(part: str, kw: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    new = dict(kw)
    n = data.draw(st.integers(0, 10_000))
    if part == "base_image":
        new[part] = data.draw(st.sampled_from([i for i in _IMAGES if i != kw[part]]))
    elif part == "base_digest":
        new[part] = data.draw(_DIGEST.filter(lambda d: d != kw[part]))
    elif part == "dockerfile":
        new[part] = (kw[part] or "FROM scratch") + f"\nRUN echo changed-{n}"
    elif part == "conda":
        conda = kw[part] or {"channels": [], "dependencies": []}
        new[part] = dict(conda, dependencies=[*conda["dependencies"], f"extra-conda-{n}=1"])
    elif part == "pip":
        new[part] = data.draw(st.sampled_from([
            [*kw[part], f"extra-pip-{n}==1"],
            [f"--extra-index-url https://mirror-{n}.example/simple", *kw[part]],
        ]))
    elif part == "user_managed":
        new[part] = not kw[part]
    elif part == "platform":
        new[part] = data.draw(st.sampled_from([p for p in _PLATFORMS if p != kw[part]]))
    elif part == "build_args":
        new[part] = dict(kw[part], EXTRA=f"v{n}")
    elif part == "registry":
        new[part] = data.draw(st.sampled_from([None, *_REGISTRIES]).filter(lambda r: r != kw[part]))
    else:  # pragma: no cover - a new part needs a mutation here
        raise AssertionError(part)
    return new


@given(_kwargs(), st.sampled_from(PART_NAMES), st.data())
def test_a_real_change_changes_the_key_and_diff_names_exactly_that_part(
    kw: dict[str, Any], part: str, data: st.DataObject
) -> None:
    before, after = _key(**kw), _key(**_mutate(part, kw, data))
    assert before != after
    assert diff_keys(before, after) == [part]
    assert diff_keys(after, before) == [part]


# -- properties: credentials --------------------------------------------------------------------

_CRED = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789-._~%!$&'()*+,;=:", min_size=1,
                max_size=12)


@given(_kwargs(), _CRED, _CRED)
def test_credentials_in_urls_never_change_the_key(kw: dict[str, Any], user: str, password: str) -> None:
    def with_auth(auth: str) -> dict[str, Any]:
        out = dict(kw)
        out["pip"] = [f"--index-url https://{auth}pypi.example/simple", *kw["pip"],
                      f"private-pkg @ git+https://{auth}git.example/org/pkg.git@v1"]
        conda = kw["conda"] or {"channels": [], "dependencies": []}
        out["conda"] = dict(
            conda,
            channels=[*conda["channels"], f"https://{auth}conda.example/private"],
            dependencies=[*conda["dependencies"], {"pip": [f"--extra-index-url https://{auth}h/s"]}],
        )
        out["build_args"] = dict(kw["build_args"], PIP_INDEX_URL=f"https://{auth}pypi.example/simple")
        out["dockerfile"] = (kw["dockerfile"] or "FROM scratch") + (
            f"\nRUN pip install --index-url https://{auth}pypi.example/simple x")
        out["registry"] = f"{auth}registry.example.com:5000"
        return out

    plain = _key(**with_auth(""))
    secret = _key(**with_auth(f"{user}:{password}@"))
    assert secret == plain
    assert _key(**with_auth(f"{password}@")) == plain  # token-as-username form


# -- properties: shape --------------------------------------------------------------------------


@given(_kwargs())
def test_keys_and_part_hashes_are_32_lowercase_hex(kw: dict[str, Any]) -> None:
    key = _key(**kw)
    assert HEX32.fullmatch(key.hex) and str(key) == key.hex
    assert key.schema == SCHEMA_VERSION
    assert set(key.parts) == set(PART_NAMES)
    assert all(HEX32.fullmatch(h) for h in key.parts.values())
    assert ContentKey.parse(key.hex) == key


def _random_kwargs(rnd: random.Random) -> dict[str, Any]:
    return {
        "base_image": rnd.choice(_IMAGES),
        "base_digest": rnd.choice([None, "sha256:" + "".join(rnd.choices("0123456789abcdef", k=64))]),
        "dockerfile": rnd.choice([None, "FROM scratch\r\nRUN true\n\n"]),
        "conda": rnd.choice([None, {"name": "e", "channels": ["conda-forge", "defaults"],
                                    "dependencies": [
                                        *rnd.sample(["python=3.11", "pip", "mkl", "numpy"], 3),
                                        {"pip": rnd.sample(["torch", "jax", "tqdm"], 2)},
                                    ]}]),
        "pip": rnd.sample(["numpy==2.1.0", "scipy", "--index-url https://u:p@h/simple", "tqdm>=4"], 3),
        "user_managed": rnd.random() < 0.5,
        "platform": rnd.choice(_PLATFORMS),
        "build_args": {"PY": rnd.choice(["3.10", "3.11"])},
        "registry": rnd.choice([None, *_REGISTRIES]),
    }


_CHILD = """
import json, sys
from dockyard.cache import KeyParts, compute_key
print(json.dumps([compute_key(KeyParts(**kw)).to_json() for kw in json.load(sys.stdin)]))
"""


def test_the_same_parts_give_the_same_key_in_two_fresh_processes() -> None:
    rnd = random.Random(1234)
    cases = [_random_kwargs(rnd) for _ in range(40)]
    expected = [compute_key(KeyParts(**kw)).to_json() for kw in cases]
    for seed in ("1", "987654"):  # set iteration order differs between these hash seeds
        env = dict(os.environ, PYTHONHASHSEED=seed)
        out = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cases), env=env,
                             capture_output=True, text=True, check=True, timeout=60).stdout
        assert json.loads(out) == expected


# -- specific rules -----------------------------------------------------------------------------

BASE = "dockyard/base:bookworm-python3"


def test_conda_name_and_prefix_are_not_content() -> None:
    spec = {"channels": ["conda-forge"], "dependencies": ["python=3.11"]}
    assert _key(base_image=BASE, conda=dict(spec, name="a")) == _key(
        base_image=BASE, conda=dict(spec, name="b", prefix="/opt/envs/b"))


def test_channel_order_is_priority_so_it_matters() -> None:
    a = _key(base_image=BASE, conda={"channels": ["conda-forge", "defaults"], "dependencies": []})
    b = _key(base_image=BASE, conda={"channels": ["defaults", "conda-forge"], "dependencies": []})
    assert diff_keys(a, b) == ["conda"]


def test_an_empty_pip_sublist_equals_no_pip_sublist() -> None:
    spec = {"channels": [], "dependencies": ["pip"]}
    with_empty = dict(spec, dependencies=["pip", {"pip": []}])
    assert _key(base_image=BASE, conda=spec) == _key(base_image=BASE, conda=with_empty)


def test_conda_pip_sublist_and_pip_requirements_are_different_parts() -> None:
    a = _key(base_image=BASE, conda={"channels": [], "dependencies": [{"pip": ["numpy"]}]})
    b = _key(base_image=BASE, conda={"channels": [], "dependencies": []}, pip=["numpy"])
    assert diff_keys(a, b) == ["conda", "pip"]


def test_pip_option_lines_are_kept_in_order() -> None:
    one, two = "--extra-index-url https://one/simple", "--extra-index-url https://two/simple"
    assert diff_keys(_key(base_image=BASE, pip=[one, two, "x"]),
                     _key(base_image=BASE, pip=[two, one, "x"])) == ["pip"]
    assert _key(base_image=BASE, pip=["x"]) != _key(base_image=BASE, pip=["-f https://h/wheels", "x"])
    assert _key(base_image=BASE, pip=["--index-url=https://h/s", "x"]) == _key(
        base_image=BASE, pip=["x", "--index-url  https://h/s"])


def test_pip_comments_fragments_and_continuations() -> None:
    assert _key(base_image=BASE, pip=["numpy==2.1  # pinned"]) == _key(base_image=BASE, pip=["numpy==2.1"])
    whl = "pkg @ https://h/pkg-1.0.whl#sha256=abc"
    assert _key(base_image=BASE, pip=[whl]) != _key(base_image=BASE, pip=["pkg @ https://h/pkg-1.0.whl"])
    assert _key(base_image=BASE, pip=["numpy\\\n==2.1"]) == _key(base_image=BASE, pip=["numpy==2.1"])
    assert _key(base_image=BASE, pip=["numpy==2.1\nscipy"]) == _key(
        base_image=BASE, pip=["scipy", "numpy==2.1"])


def test_dockerfile_whitespace_inside_lines_is_content() -> None:
    a = _key(base_image=None, dockerfile="FROM scratch\nCOPY <<EOF /f\nhi  \nEOF\n")
    b = _key(base_image=None, dockerfile="FROM scratch\nCOPY <<EOF /f\nhi\nEOF\n")
    assert diff_keys(a, b) == ["dockerfile"]
    assert _key(base_image=None, dockerfile="\ufeffFROM scratch\r\n\r\n") == _key(
        base_image=None, dockerfile="FROM scratch")


def test_absent_and_present_optional_parts_differ() -> None:
    assert diff_keys(_key(base_image=BASE), _key(base_image=BASE, registry="localhost:5000")) == ["registry"]
    assert diff_keys(_key(base_image=BASE), _key(base_image=BASE, dockerfile="FROM x")) == ["dockerfile"]
    assert diff_keys(_key(base_image=BASE), _key(base_image=BASE, conda={})) == ["conda"]


def test_normalised_spellings_of_platform_and_registry() -> None:
    assert _key(base_image=BASE, platform=" Linux/AMD64 ") == _key(base_image=BASE)
    assert _key(base_image=BASE, registry="https://Registry.Example.com:5000/") == _key(
        base_image=BASE, registry="registry.example.com:5000")


# -- validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"base_image": None}, "base_image"),
        ({"base_image": "has space:1"}, "base_image"),
        ({"base_image": 3}, "base_image"),
        ({"base_image": BASE, "base_digest": "sha256:abc"}, "base_digest"),
        ({"base_image": BASE, "dockerfile": "  \n"}, "dockerfile"),
        ({"base_image": BASE, "pip": "numpy\nscipy"}, "pip"),
        ({"base_image": BASE, "pip": ["ok", 3]}, "pip[1]"),
        ({"base_image": BASE, "pip": ["a\x00b"]}, "pip[0]"),
        ({"base_image": BASE, "conda": ["python"]}, "conda"),
        ({"base_image": BASE, "conda": {"dependencies": "python"}}, "conda.dependencies"),
        ({"base_image": BASE, "conda": {"channels": "conda-forge"}}, "conda.channels"),
        ({"base_image": BASE, "conda": {"dependencies": [{"conda": ["x"]}]}}, "conda.dependencies[0]"),
        ({"base_image": BASE, "conda": {"dependencies": [3]}}, "conda.dependencies[0]"),
        ({"base_image": BASE, "conda": {"dependencies": [], "solver": "x"}}, "conda.solver"),
        ({"base_image": BASE, "user_managed": "false"}, "user_managed"),
        ({"base_image": BASE, "platform": "amd64"}, "platform"),
        ({"base_image": BASE, "build_args": {"1BAD": "x"}}, "build_args"),
        ({"base_image": BASE, "build_args": {"A": 1}}, "build_args.A"),
        ({"base_image": BASE, "build_args": {"HF_TOKEN": "x"}}, "build_args.HF_TOKEN"),
        ({"base_image": BASE, "build_args": {"DB_PASSWORD": "x"}}, "build_args.DB_PASSWORD"),
        ({"base_image": BASE, "build_args": ["A=1"]}, "build_args"),
        ({"base_image": BASE, "registry": "not a host"}, "registry"),
    ],
)
def test_invalid_parts_name_the_field_and_the_fix(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidKeyParts) as info:
        KeyParts(**kwargs)
    err = info.value
    assert err.field == field
    assert err.part == field.split(".")[0].split("[")[0]
    assert err.hint, "every bad-input error says what to do"
    assert isinstance(err, CacheInputError) and isinstance(err, CacheError)
    assert err.exit_code == 2
    assert f"KeyParts.{field}" in str(err)


def test_build_arg_names_that_only_contain_secret_words_are_fine() -> None:
    KeyParts(BASE, build_args={"TOKENIZERS_PARALLELISM": "false", "AUTHOR": "me"})


def test_keyparts_are_frozen_deep_and_hashable() -> None:
    pip = ["numpy"]
    conda = {"channels": ["conda-forge"], "dependencies": ["python", {"pip": ["torch"]}]}
    parts = KeyParts(BASE, pip=pip, conda=conda, build_args={"A": "1"})
    before = compute_key(parts)
    pip.append("scipy")
    conda["dependencies"].append("mkl")  # type: ignore[attr-defined]
    assert compute_key(parts) == before  # later edits of the caller's lists change nothing
    with pytest.raises(AttributeError):
        parts.pip = ()  # type: ignore[misc]
    with pytest.raises(TypeError):
        parts.build_args["B"] = "2"  # type: ignore[index]
    assert hash(parts) == hash(KeyParts(BASE, pip=["numpy"], conda=conda | {"dependencies": [
        "python", {"pip": ["torch"]}]}, build_args={"A": "1"}))
    with pytest.raises(InvalidKeyParts):
        compute_key({"base_image": BASE})  # type: ignore[arg-type]


# -- ContentKey ----------------------------------------------------------------------------------


def test_content_key_parse_validates_and_normalises() -> None:
    key = _key(base_image=BASE)
    assert ContentKey.parse(f"  {key.hex.upper()}\n") == key
    assert ContentKey.parse(key.hex).parts == {}
    for bad in ["", "xyz", key.hex[:-1], key.hex + "0", "g" * 32, 42]:
        with pytest.raises(InvalidKey) as info:
            ContentKey.parse(bad)  # type: ignore[arg-type]
        assert info.value.exit_code == 2 and info.value.hint
    with pytest.raises(InvalidKey):
        ContentKey("A" * 32)


def test_to_json_is_the_env_key_json_shape() -> None:
    key = _key(base_image=BASE, pip=["numpy"])
    doc = json.loads(json.dumps(key.to_json()))
    assert set(doc) == {"key", "schema", "parts"}
    assert doc["key"] == key.hex and doc["schema"] == SCHEMA_VERSION
    assert set(doc["parts"]) == set(PART_NAMES) and doc["parts"] == dict(key.parts)


def test_diff_keys_needs_parts_to_explain() -> None:
    a, b = _key(base_image=BASE), _key(base_image=BASE, pip=["x"])
    assert diff_keys(a, a) == []
    assert diff_keys(ContentKey.parse(a.hex), a) == []
    with pytest.raises(InvalidKey):
        diff_keys(ContentKey.parse(a.hex), b)
    other_schema = ContentKey(b.hex, SCHEMA_VERSION + 1, b.parts)
    assert diff_keys(a, other_schema) == ["schema", "pip"]


def test_context_must_be_a_digest_and_needs_a_dockerfile() -> None:
    from dockyard.cache import InvalidKeyParts, KeyParts

    with pytest.raises(InvalidKeyParts) as bad:
        KeyParts(None, dockerfile="FROM x\n", context="not-a-digest")
    assert bad.value.field == "context"
    with pytest.raises(InvalidKeyParts) as lonely:
        KeyParts("busybox", context="0" * 32)
    assert lonely.value.field == "context" and "dockerfile" in lonely.value.message
    upper = KeyParts(None, dockerfile="FROM x\n", context="AB" * 16)
    assert upper.context == "ab" * 16


def test_diff_keys_names_the_context() -> None:
    from dockyard.cache import KeyParts, compute_key, diff_keys

    a = compute_key(KeyParts(None, dockerfile="FROM x\n", context="0" * 32))
    b = compute_key(KeyParts(None, dockerfile="FROM x\n", context="1" * 32))
    c = compute_key(KeyParts(None, dockerfile="FROM x\n"))
    assert diff_keys(a, b) == ["context"]
    assert diff_keys(a, c) == ["context"]
    assert c.parts.get("context") is None


def test_unresolved_key_is_the_key_of_the_same_parts_without_a_base_digest() -> None:
    from dockyard.cache import KeyParts, compute_key, unresolved_key

    spec = dict(base_image="dockyard/base:bookworm-python3", pip=["numpy"])
    before = compute_key(KeyParts(**spec))
    after = compute_key(KeyParts(**spec, base_digest="sha256:" + "a" * 64))
    assert unresolved_key(after.parts) == before.hex == unresolved_key(before.parts)
    ctx = dict(base_image=None, dockerfile="FROM x\nCOPY a /a\n", context="c" * 32)
    assert unresolved_key(compute_key(KeyParts(**ctx, base_digest="sha256:" + "b" * 64)).parts) == \
        compute_key(KeyParts(**ctx)).hex
