"""Methods FuseLab ships beyond the built-in comparison, each one file written against the public extension
points only (`harness.methods.register_method`, `harness.graph.Graph`, `harness.stages`, `harness.contestants`):

- `kd`: knowledge distillation from one teacher that shares the target's tokenizer (the paper's Table 6).
- `fuse_then_merge`: FuseChat's pipeline, one FuseLLM target per source, then merged with mergekit.
- `fuse_pool`: FuseLLM and the output ensemble over the domain pool's experts (the paper's Table 7).

Switch them on in an experiment config: `methods: {kd: {teacher: {ref: ...}}, fuse_then_merge: {}}`.
"""
from . import fuse_pool, fuse_then_merge, kd  # noqa: F401  (registration on import)
