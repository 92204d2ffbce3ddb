"""Where the shared cache's setting comes from: flag > variable > workspace config, and its shapes."""

from __future__ import annotations

import json

import pytest
from dockyard import Workspace
from dockyard.build import CacheRegistry, resolve_cache_registry
from dockyard.errors import InputError
from dockyard.runs import RunRuntime


def test_a_setting_is_a_string_or_an_object_with_the_credentials_names() -> None:
    plain = CacheRegistry.from_setting("127.0.0.1:5000/team/cache", "config.json")
    assert (plain.address, plain.repository, plain.username) == ("127.0.0.1:5000", "team/cache", None)
    full = CacheRegistry.from_setting(
        {"address": "reg.example:5000/ml/cache", "username": "ci", "password_env": "CACHE_PW"}, "config.json")
    assert (str(full), full.username, full.password_env) == ("reg.example:5000/ml/cache", "ci", "CACHE_PW")


@pytest.mark.parametrize(("value", "says"), [
    ({"address": "reg.example/x", "password": "hunter2"}, "must not hold a password"),
    ({"address": "reg.example/x", "user": "ci"}, "unknown field(s) user"),
    ({"username": "ci"}, "address is missing"),
    ({"address": 5}, "address must be a string"),
    (["reg.example/x"], "must be \"REG/REPO\" or an object"),
    ({"address": "noport/x"}, "is not REG/REPO"),
    ({"address": "reg.example/x", "password_env": "a=b"}, "NAME of a variable"),
])
def test_a_bad_setting_says_where_and_what(value: object, says: str) -> None:
    with pytest.raises(InputError) as err:
        CacheRegistry.from_setting(value, "/p/config.json: field cache_registry")
    assert says in err.value.message and err.value.message.startswith("/p/config.json: field cache_registry")
    assert "hunter2" not in str(err.value)


def test_the_flag_wins_then_the_variable_then_the_workspace() -> None:
    ws = CacheRegistry.parse("ws.example:1/ws", username="w", password_env="WS_PW")
    env = {"DOCKYARD_CACHE_REGISTRY": "env.example:2/env", "DOCKYARD_CACHE_REGISTRY_USERNAME": "e"}
    assert str(resolve_cache_registry("flag.example:3/f", ws, env)) == "flag.example:3/f"
    assert resolve_cache_registry("", ws, env) is None, "an empty flag turns it off"
    found = resolve_cache_registry(None, ws, env)
    assert found is not None and (str(found), found.username) == ("env.example:2/env", "e")
    assert resolve_cache_registry(None, ws, {}) is ws
    assert resolve_cache_registry(None, None, {"DOCKYARD_CACHE_REGISTRY": "  "}) is None


def test_the_workspace_config_carries_it_and_write_config_keeps_names_not_secrets(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DOCKYARD_CACHE_REGISTRY", raising=False)
    (tmp_path / "config.json").write_text(json.dumps({"workspace_name": "team", "cache_registry": {
        "address": "reg.example:5000/team/cache", "username": "ci", "password_env": "CACHE_PW"}}))
    ws = Workspace.from_config(tmp_path)
    assert ws.cache_registry is not None and str(ws.shared_cache()) == "reg.example:5000/team/cache"
    monkeypatch.setenv("DOCKYARD_CACHE_REGISTRY", "other.example:1/o")
    assert str(ws.shared_cache()) == "other.example:1/o", "the variable overrides the workspace"
    out = tmp_path / "again"
    out.mkdir()
    ws.write_config(out)
    data = json.loads((out / "config.json").read_text())
    assert data["cache_registry"] == {"address": "reg.example:5000/team/cache", "username": "ci",
                                      "password_env": "CACHE_PW"}
    found = Workspace.find(out)
    assert found is not None and found.cache_registry == ws.cache_registry


def test_a_broken_setting_in_config_json_names_the_file(tmp_path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"workspace_name": "t", "cache_registry": {"addr": "x"}}))
    with pytest.raises(InputError) as err:
        Workspace.find(tmp_path)
    assert str(tmp_path / "config.json") in err.value.message and "unknown field(s) addr" in err.value.message


def test_find_is_none_without_a_config(tmp_path) -> None:
    assert Workspace.find(tmp_path) is None
    with pytest.raises(InputError, match=r"no config\.json found"):
        Workspace.from_config(tmp_path)


def test_a_runs_shared_cache_round_trips_and_old_runs_have_none() -> None:
    runtime = RunRuntime().with_shared_cache("reg.example:5000/c", "ci", "CACHE_PW")
    again = RunRuntime.from_dict(runtime.to_dict())
    assert again.shared_cache == ("reg.example:5000/c", "ci", "CACHE_PW")
    assert RunRuntime.from_dict({}).shared_cache is None
    assert "shared_cache" not in RunRuntime().to_dict()
    assert RunRuntime.from_dict(RunRuntime().with_shared_cache("", "", "").to_dict()).shared_cache == ("", "", "")
