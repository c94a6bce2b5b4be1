"""Compiler passes, registered by name (importing this package registers them all)."""

from passes import balance_stages, insert_kv_cache, lift_idioms, place_weights, quantize, schedule, tile_partition
from passes.manager import REGISTRY, PassContext, PassManager, parse_pipeline

__all__ = ["REGISTRY", "PassContext", "PassManager", "balance_stages", "insert_kv_cache", "lift_idioms",
           "parse_pipeline", "place_weights", "quantize", "schedule", "tile_partition"]
