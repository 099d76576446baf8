"""Compression passes, registered by the name a recipe uses."""

from moeexport.passes.base import CompressionPass, PassOptions
from moeexport.passes.merge import Merge
from moeexport.passes.prune import Prune
from moeexport.passes.quantize import Quantize
from moeexport.passes.trim import BlockDrop, ExpertDrop, LayerDrop

PASSES: dict[str, CompressionPass] = {p.name: p for p in (BlockDrop(), LayerDrop(), ExpertDrop(), Merge(), Prune(), Quantize())}

__all__ = ["PASSES", "CompressionPass", "PassOptions"]
