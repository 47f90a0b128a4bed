"""The FuseLLM method (Wan et al., ICLR 2024) as plain functions.

Never imports `harness`: everything takes models, tokenizers, arrays and dataclasses.
"""

# Importing the method modules fills the registries (ALIGNMENTS, VOCAB_MAPS, FUSIONS) by name.
from . import align, boundary, fuse, vocab  # noqa: E402,F401
