"""The FuseLLM method (Wan et al., ICLR 2024) as plain functions.

Never imports `harness`: everything takes models, tokenizers, arrays and dataclasses.
"""
