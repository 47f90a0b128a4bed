"""The micro world: an offline, seeded set of tiny source LMs with different architectures and tokenizers,
a three-domain corpus and local lm-eval tasks, the default world for a first FuseLab run on a laptop CPU.

``build_micro_world(root, seed)`` builds it (or returns the cached one); see `harness.micro.build`.
"""
from .build import DEFAULT_SIZES, MicroSizes, MicroWorld, build_micro_world, micro_world_version
from .corpus import DOMAINS, CorpusSizes
from .sources import SOURCE_SPECS, TARGET_NAME, SourceSpec, TrainSizes, heldout_bits_per_byte

__all__ = ["DEFAULT_SIZES", "DOMAINS", "SOURCE_SPECS", "TARGET_NAME", "CorpusSizes", "MicroSizes", "MicroWorld",
           "SourceSpec", "TrainSizes", "build_micro_world", "heldout_bits_per_byte", "micro_world_version"]
