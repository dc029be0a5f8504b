"""One size convention: GB = 10**9, GiB = 2**30; sizes print the way a user would write them."""
from __future__ import annotations

import pytest

from cluster.harness import parse_size
from workers.units import format_bytes, parse_bytes


@pytest.mark.parametrize("text,n", [
    ("2G", 2 * 10**9), ("2GB", 2 * 10**9), ("2gb", 2 * 10**9), ("2GiB", 2 * 2**30), ("2gi", 2 * 2**30),
    ("512MiB", 512 * 2**20), ("1.5 GiB", 3 * 2**29), ("3e9", 3 * 10**9), ("0.1KB", 100), ("1.5KiB", 1536),
    ("2500MB", 25 * 10**8), ("100", 100), (" 7 B ", 7), (4096, 4096), (3e9, 3 * 10**9), (None, None),
])
def test_parse_bytes(text, n):
    assert parse_bytes(text) == n


def test_harness_parses_sizes_the_same_way():
    for text in ("2G", "2GB", "2GiB", "512MiB", "2500MB", 1000):
        assert parse_size(text) == parse_bytes(text)


@pytest.mark.parametrize("bad", ["-1GB", -5, "2GX", "", "1e", True, float("nan"), "GB"])
def test_parse_bytes_refuses_with_one_line(bad):
    with pytest.raises(ValueError) as e:
        parse_bytes(bad)
    msg = str(e.value)
    assert "\n" not in msg and "2GB" in msg


@pytest.mark.parametrize("n,text", [
    (0, "0 B"), (999, "999 B"), (1000, "1 KB"), (1024, "1 KiB"), (1536, "1.5 KiB"), (19008, "19.008 KB"),
    (3 * 2**20, "3 MiB"), (3 * 10**6, "3 MB"), (3 * 2**20 + 1, "3.15 MB"), (10**9, "1 GB"),
    (3 * 2**29, "1.5 GiB"), (10**12, "1 TB"), (2**40, "1 TiB"), (123456789, "123.46 MB"), (2.5e9 / 3, "833.33 MB"),
    (-2048, "-2 KiB"),
])
def test_format_bytes_prints_what_a_user_wrote(n, text):
    assert format_bytes(n) == text


@pytest.mark.parametrize("text", ["3MiB", "3MB", "2GB", "1.5GiB", "512KiB", "750MB", "64MiB", "1TB"])
def test_format_round_trips_what_a_user_wrote(text):
    assert parse_bytes(format_bytes(parse_bytes(text))) == parse_bytes(text)
