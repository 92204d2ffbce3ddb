import pytest
from dockyard.build._image_gc import parse_size
from dockyard.errors import InputError


@pytest.mark.parametrize(
    ("text", "size"),
    [("0", 0), ("1048576", 1048576), ("20G", 20 * 10**9), ("500MiB", 500 * 2**20), ("1.5 gb", 1_500_000_000), ("3k", 3000)],
)
def test_sizes(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["", "12Q", "-1G", "G", "ten"])
def test_bad_sizes(text):
    with pytest.raises(InputError, match="not a size"):
        parse_size(text)
