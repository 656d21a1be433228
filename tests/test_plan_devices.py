"""The device table: the shipped example loads, and bad files fail with file:line messages."""

from pathlib import Path

import pytest

from ling_train.plan.devices import DeviceTableError, load_device_table, parse_device_table

EXAMPLE = Path(__file__).parents[1] / "examples" / "ling_report_devices.toml"

GOOD = """\
currency = "USD"

[[device]]
name = "X"
bf16_tflops = 100
memory_gib = 40
intra_node_gbps = 100
inter_node_gbps = 10
price_per_hour = 2

[[cluster]]
name = "east"
device = "X"
count = 16

[[cluster]]
name = "west"
device = "X"
count = 8
"""


def test_example_is_the_reports_table():
    table = load_device_table(EXAMPLE)
    spec = {name: (d.bf16_tflops, d.memory_gib, d.price_per_hour, d.fp8) for name, d in table.devices.items()}
    assert spec == {"A": (370, 64, 7, False), "B": (120, 96, 4.5, False), "C": (312, 80, 10, False),
                    "D": (989, 80, 27.5, True), "E": (147, 96, 5.64, True)}
    assert [c.name for c in table.clusters] == list("ABCDE") and table.currency == "RMB"


def test_several_clusters_of_one_class():
    table = parse_device_table(GOOD, "t.toml")
    assert [(c.name, c.count) for c in table.clusters_of("X")] == [("east", 16), ("west", 8)]


@pytest.mark.parametrize("old, new, expected", [
    ("bf16_tflops = 100", "bf16_tflops = -1", "t.toml:5: [[device]] bf16_tflops: expected a number > 0"),
    ("memory_gib = 40", "memory_gib = \"40\"", "t.toml:6: [[device]] memory_gib: expected a number > 0"),
    ("price_per_hour = 2", "price_per_hour = 2\ncolour = 1", "t.toml:10: [[device]] unknown key 'colour'"),
    ("price_per_hour = 2\n", "", "t.toml:3: [[device]] is missing 'price_per_hour'"),
    ('device = "X"\ncount = 16', 'device = "Y"\ncount = 16', "t.toml:13: [[cluster]] device 'Y' is not"),
    ("count = 8", "count = 0", "t.toml:19: [[cluster]] count: expected an integer >= 1"),
    ('currency = "USD"', "currency = ", "t.toml:1: invalid TOML"),
    ('currency = "USD"', 'currency = "USD"\nregion = 1', "t.toml:2: unknown key 'region'"),
])
def test_errors_name_file_and_line(old, new, expected):
    assert old in GOOD
    with pytest.raises(DeviceTableError) as error:
        parse_device_table(GOOD.replace(old, new, 1), "t.toml")
    assert str(error.value).startswith(expected), str(error.value)


def test_missing_file(tmp_path):
    with pytest.raises(DeviceTableError, match="not found"):
        load_device_table(tmp_path / "nope.toml")
