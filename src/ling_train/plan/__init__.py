"""`ling-plan`: what a training run needs (memory per device), how long it takes and what it costs
on the devices you have, before renting anything; plus scaling-law fits for lr and batch size."""

from ling_train.plan.devices import Cluster, DeviceClass, DeviceTable, DeviceTableError, load_device_table
from ling_train.plan.memory import Layout, MemoryBreakdown, Precision, memory_per_device

__all__ = [
    "Cluster", "DeviceClass", "DeviceTable", "DeviceTableError", "load_device_table",
    "Layout", "MemoryBreakdown", "Precision", "memory_per_device"
]
