"""Pure: the model memory profile, the GPU inventory and placement. No I/O.

The operator's path through it: `ModelArchitecture.from_hf_config(config_json)`, then
`inventory_from_nodes(nodes, pods)`, then `plan_placement(SizingRequest(...), inventory)`.
"""

from slmfleet.sizing.architecture import ModelArchitecture, Quantization, SizingInputError, VisionTower
from slmfleet.sizing.inventory import DeviceClass, Inventory, LiveInventory, NodeGpus, inventory_from_nodes
from slmfleet.sizing.memory import (
    MemoryProfile,
    Overhead,
    kv_bytes_per_token,
    memory_profile,
    weights_bytes,
    weights_bytes_from_safetensors_headers,
    weights_bytes_from_safetensors_index,
)
from slmfleet.sizing.parameters import ParameterCounts, parameter_count, parameter_counts
from slmfleet.sizing.placement import Placement, SizingRequest, SizingResult, placement_key, plan_placement

__all__ = [
    "DeviceClass",
    "Inventory",
    "LiveInventory",
    "MemoryProfile",
    "ModelArchitecture",
    "NodeGpus",
    "Overhead",
    "ParameterCounts",
    "Placement",
    "Quantization",
    "SizingInputError",
    "SizingRequest",
    "SizingResult",
    "VisionTower",
    "inventory_from_nodes",
    "kv_bytes_per_token",
    "memory_profile",
    "parameter_count",
    "parameter_counts",
    "placement_key",
    "plan_placement",
    "weights_bytes",
    "weights_bytes_from_safetensors_headers",
    "weights_bytes_from_safetensors_index",
]
