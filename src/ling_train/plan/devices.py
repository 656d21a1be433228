"""The device table: accelerator classes (speed, memory, links, price) and the clusters you have.

TOML layout (see examples/ling_report_devices.toml):

    currency = "RMB"
    [[device]]                 # one table per accelerator class
    name = "D"
    bf16_tflops = 989          # peak dense bf16 TFLOP/s (spec sheet)
    memory_gib = 80
    intra_node_gbps = 450      # GB/s per device inside a node (NVLink-class)
    inter_node_gbps = 50       # GB/s per device across nodes (NIC)
    price_per_hour = 27.5      # per device
    devices_per_node = 8       # optional, default 8
    fp8 = true                 # optional, default false
    mfu = 0.4                  # optional: assumed model FLOPs utilisation on this class
    [[cluster]]                # optional; default: one cluster per device class
    name = "D-pool"
    device = "D"
    count = 1024

Errors name the file and the line of the offending key, like a compiler.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class DeviceTableError(ValueError):
    """A device table file is malformed; the message names file:line and what was expected."""


@dataclass(frozen=True)
class DeviceClass:
    name: str
    bf16_tflops: float
    memory_gib: float
    intra_node_gbps: float
    inter_node_gbps: float
    price_per_hour: float
    devices_per_node: int = 8
    fp8: bool = False
    mfu: float | None = None  # None: the planner's --mfu default

    @property
    def peak_flops(self) -> float:
        return self.bf16_tflops * 1e12


@dataclass(frozen=True)
class Cluster:
    name: str
    device: DeviceClass
    count: int


@dataclass
class DeviceTable:
    devices: dict[str, DeviceClass]
    clusters: list[Cluster]
    currency: str = ""
    source: str = ""
    notes: dict[str, Any] = field(default_factory=dict)

    def clusters_of(self, device_name: str) -> list[Cluster]:
        return [c for c in self.clusters if c.device.name == device_name]


# key: (type, required, constraint description, check)
_NUMBER = (int, float)
_DEVICE_KEYS: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "name": ((str,), True, "a non-empty string"),
    "bf16_tflops": (_NUMBER, True, "a number > 0"),
    "memory_gib": (_NUMBER, True, "a number > 0"),
    "intra_node_gbps": (_NUMBER, True, "a number > 0"),
    "inter_node_gbps": (_NUMBER, True, "a number > 0"),
    "price_per_hour": (_NUMBER, True, "a number >= 0"),
    "devices_per_node": ((int,), False, "an integer >= 1"),
    "fp8": ((bool,), False, "true or false"),
    "mfu": (_NUMBER, False, "a number in (0, 1]"),
    "count": ((int,), False, "an integer >= 1"),  # shorthand: a cluster of this class
}
_CLUSTER_KEYS: dict[str, tuple[tuple[type, ...], bool, str]] = {
    "name": ((str,), True, "a non-empty string"),
    "device": ((str,), True, "the name of a [[device]]"),
    "count": ((int,), True, "an integer >= 1"),
}
_TOP_KEYS = {"currency", "device", "cluster", "notes"}


class _Lines:
    """Finds the line of `key = ...` inside the n-th `[[table]]` of the source text."""

    def __init__(self, text: str):
        self.lines = text.splitlines()

    def header(self, table: str, index: int) -> int:
        seen = -1
        for number, line in enumerate(self.lines, 1):
            if re.match(rf"\s*\[\[\s*{table}\s*\]\]", line):
                seen += 1
                if seen == index:
                    return number
        return 1

    def key(self, table: str, index: int, key: str) -> int:
        start = self.header(table, index)
        for number in range(start + 1, len(self.lines) + 1):
            line = self.lines[number - 1]
            if re.match(r"\s*\[", line):
                break
            if re.match(rf"\s*{re.escape(key)}\s*=", line):
                return number
        return start

    def top(self, key: str) -> int:
        for number, line in enumerate(self.lines, 1):
            if re.match(rf"\s*(\[\[?\s*)?{re.escape(key)}\b", line):
                return number
        return 1


def _valid(key: str, value: Any) -> bool:
    if key in ("bf16_tflops", "memory_gib", "intra_node_gbps", "inter_node_gbps"):
        return value > 0
    if key == "price_per_hour":
        return value >= 0
    if key in ("devices_per_node", "count"):
        return value >= 1
    if key == "mfu":
        return 0 < value <= 1
    if key == "name":
        return bool(value.strip())
    return True


def _check_entry(path: Path, lines: _Lines, table: str, index: int, entry: Any,
                 spec: dict[str, tuple[tuple[type, ...], bool, str]]) -> dict[str, Any]:
    where = f"{path}:{lines.header(table, index)}"
    if not isinstance(entry, dict):
        raise DeviceTableError(f"{where}: [[{table}]] must be a table")
    for key, value in entry.items():
        if key not in spec:
            raise DeviceTableError(f"{path}:{lines.key(table, index, key)}: [[{table}]] unknown key "
                                   f"{key!r}; expected one of {', '.join(spec)}")
        types, _, expected = spec[key]
        wrong_type = not isinstance(value, types) or (bool not in types and isinstance(value, bool))
        if wrong_type or not _valid(key, value):
            raise DeviceTableError(f"{path}:{lines.key(table, index, key)}: [[{table}]] {key}: "
                                   f"expected {expected}, got {value!r}")
    for key, (_, required, expected) in spec.items():
        if required and key not in entry:
            raise DeviceTableError(f"{where}: [[{table}]] is missing {key!r} ({expected})")
    return entry


def parse_device_table(text: str, path: str | Path = "<devices>") -> DeviceTable:
    path = Path(path)
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        match = re.search(r"line (\d+)", str(e))
        line = match.group(1) if match else "1"
        raise DeviceTableError(f"{path}:{line}: invalid TOML ({e})") from None
    lines = _Lines(text)
    for key in raw:
        if key not in _TOP_KEYS:
            raise DeviceTableError(f"{path}:{lines.top(key)}: unknown key {key!r}; expected "
                                   f"currency, [[device]], [[cluster]] or [notes]")
    entries = raw.get("device", [])
    if not isinstance(entries, list) or not entries:
        raise DeviceTableError(f"{path}:1: expected at least one [[device]] table")
    devices: dict[str, DeviceClass] = {}
    shorthand: list[Cluster] = []
    for index, entry in enumerate(entries):
        entry = dict(_check_entry(path, lines, "device", index, entry, _DEVICE_KEYS))
        if entry["name"] in devices:
            raise DeviceTableError(f"{path}:{lines.key('device', index, 'name')}: duplicate device "
                                   f"name {entry['name']!r}")
        count = entry.pop("count", None)
        device = DeviceClass(**{k: (float(v) if isinstance(v, int) and _DEVICE_KEYS[k][0] == _NUMBER
                                    else v) for k, v in entry.items()})
        devices[device.name] = device
        if count is not None:
            shorthand.append(Cluster(device.name, device, count))
    clusters: list[Cluster] = []
    cluster_entries = raw.get("cluster", [])
    if not isinstance(cluster_entries, list):
        raise DeviceTableError(f"{path}:{lines.top('cluster')}: cluster must be [[cluster]] tables")
    for index, entry in enumerate(cluster_entries):
        entry = _check_entry(path, lines, "cluster", index, entry, _CLUSTER_KEYS)
        if entry["device"] not in devices:
            raise DeviceTableError(f"{path}:{lines.key('cluster', index, 'device')}: [[cluster]] "
                                   f"device {entry['device']!r} is not a [[device]] name; expected "
                                   f"one of {', '.join(devices)}")
        clusters.append(Cluster(entry["name"], devices[entry["device"]], entry["count"]))
    clusters = shorthand + clusters
    if not clusters:
        raise DeviceTableError(f"{path}:1: no devices to plan on: give [[device]] a count or add "
                               f"[[cluster]] tables")
    currency = raw.get("currency", "")
    if not isinstance(currency, str):
        raise DeviceTableError(f"{path}:{lines.top('currency')}: currency: expected a string")
    notes = raw.get("notes", {})
    return DeviceTable(devices, clusters, currency, str(path), notes if isinstance(notes, dict) else {})


def load_device_table(path: str | Path) -> DeviceTable:
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise DeviceTableError(f"{path}: device table not found (expected a TOML file)") from None
    return parse_device_table(text, path)
