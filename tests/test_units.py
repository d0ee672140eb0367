"""Quantities both ways, table-driven."""
import pytest

from reconciler.units import UnitError, format_bytes, parse_bytes

CASES = [
    ("512MiB", 512 * 2**20), ("10GiB", 10 * 2**30), ("1TiB", 2**40), ("500MB", 500 * 10**6),
    ("2G", 2 * 10**9), ("64KiB", 65536), ("1.5GiB", 3 * 2**29), (4096, 4096), ("100", 100), ("7B", 7),
    (" 8 MiB ", 8 * 2**20),
]


@pytest.mark.parametrize("text,expected", CASES)
def test_parse(text, expected):
    assert parse_bytes(text) == expected


@pytest.mark.parametrize("bad", ["", "MiB", "-1GiB", "0", 0, -5, "1.2.3G", "5 parsecs", "1e9", True, None, [1], "0.1B"])
def test_parse_refuses(bad):
    with pytest.raises(UnitError):
        parse_bytes(bad)


@pytest.mark.parametrize("n,text", [(512 * 2**20, "512MiB"), (2**30, "1GiB"), (1000, "1000"), (1536, "1536"),
                                    (3 * 2**29, "1536MiB"), (2**40, "1TiB")])
def test_format(n, text):
    assert format_bytes(n) == text
    assert parse_bytes(format_bytes(n)) == n
