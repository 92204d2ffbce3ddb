"""Which published key a near miss imports layers from (pure logic)."""

from __future__ import annotations

from dockyard.build import nearest_key


def h(c: str) -> str:
    return c * 32


BASE = {"base_image": h("1"), "base_digest": h("2"), "platform": h("3"), "dockerfile": h("4"), "conda": h("5"),
        "pip": h("6"), "user_managed": h("7"), "build_args": h("8"), "registry": h("9")}


def test_the_same_dockerfile_with_other_arguments_or_dependencies_is_a_neighbour() -> None:
    mine = {**BASE, "build_args": h("a")}
    published = {h("b"): BASE, h("c"): {**BASE, "build_args": h("d"), "pip": h("e")}}
    assert nearest_key(mine, published) == (h("b"), 8), "the most equal parts win"


def test_an_edited_dockerfile_is_a_neighbour_only_when_nothing_else_changed() -> None:
    edited = {**BASE, "dockerfile": h("a")}
    assert nearest_key(edited, {h("b"): BASE}) == (h("b"), 8)
    assert nearest_key({**edited, "pip": h("c")}, {h("b"): BASE}) is None, "too far: nothing worth pulling"


def test_another_base_or_platform_is_never_a_neighbour_nor_is_the_key_itself() -> None:
    mine = {**BASE, "pip": h("a")}
    for name in ("base_image", "base_digest", "platform"):
        assert nearest_key(mine, {h("b"): {**BASE, name: h("f")}}) is None
    assert nearest_key(BASE, {h("b"): dict(BASE)}) is None


def test_a_context_part_counts_and_ties_go_to_the_smallest_key() -> None:
    mine = {**BASE, "context": h("a")}
    published = {h("e"): {**BASE, "context": h("b")}, h("c"): {**BASE, "context": h("d")}}
    assert nearest_key(mine, published) == (h("c"), 9)
    assert nearest_key(BASE, {h("c"): {**BASE, "context": h("d")}}) == (h("c"), 9)
    assert nearest_key(BASE, {h("c"): {**BASE, "novel_part": h("d")}}) is None, "another key schema"
