from __future__ import annotations

import inspect

import dockyard.errors as errors
import pytest
from dockyard.errors import DockyardError, SpecError, scrub


def test_every_public_error_is_in_the_tree_and_drawn_in_the_docstring():
    classes = [getattr(errors, n) for n in errors.__all__ if inspect.isclass(getattr(errors, n))]
    assert classes, "errors module exports no classes"
    for cls in classes:
        assert issubclass(cls, DockyardError), cls
        assert cls.__name__ in errors.__doc__, f"{cls.__name__} missing from the tree drawing"


@pytest.mark.parametrize(
    ("cls", "code"),
    [
        (errors.InputError, 2),
        (errors.SpecError, 2),
        (errors.ToolMissing, 3),
        (errors.BuildKitUnavailable, 3),
        (errors.JobFailed, 1),
    ],
)
def test_exit_codes(cls, code):
    assert cls.exit_code == code


def test_engine_unavailable_names_the_fix():
    exc = errors.EngineUnavailable("unix:///x.sock", "the socket does not exist")
    assert "unix:///x.sock" in str(exc)
    assert "scripts/setup-engine" in exc.hint
    assert exc.exit_code == 3


def test_spec_error_says_where():
    exc = SpecError("unknown field", path="env.yml", line=7, field="docker.bse_image", hint="did you mean base_image?")
    assert str(exc).startswith("env.yml:7 field 'docker.bse_image': unknown field")
    assert exc.line == 7 and exc.field == "docker.bse_image"


def test_bootstrap_error_keeps_step_and_log_tail():
    exc = errors.BootstrapError("debootstrap exited with status 1", step="debootstrap", log_tail="E: boom")
    assert exc.step == "debootstrap" and exc.log_tail == "E: boom"


@pytest.mark.parametrize(
    "text",
    [
        "pull https://alice:hunter2-secret@registry.local/v2/ failed",
        'auth: {"password": "hunter2-secret"}',
        "login failed for password=hunter2-secret",
    ],
)
def test_scrub_removes_credential_shapes(text):
    out = scrub(text)
    assert "hunter2-secret" not in out
    assert "***" in out


def test_scrub_removes_known_secrets_anywhere():
    assert scrub("the value xyz-123-pw leaked", "xyz-123-pw") == "the value *** leaked"
    assert scrub("nothing here", None, "") == "nothing here"
