"""The encoder: instructions in, task embeddings out (PIE prompt, pooling, normalisation), on torch or
on ONNX Runtime."""

from icl_retriever.encoder.config import (
    PIE_CONFIG_FILE,
    TEMPLATES,
    EncoderConfig,
    Pooling,
    Runtime,
    apply_template,
    resolve_template,
)
from icl_retriever.encoder.loading import quiet_transformers
from icl_retriever.encoder.pie import PIEEncoder

__all__ = [
    "PIE_CONFIG_FILE",
    "TEMPLATES",
    "EncoderConfig",
    "PIEEncoder",
    "Pooling",
    "Runtime",
    "apply_template",
    "quiet_transformers",
    "resolve_template",
]
