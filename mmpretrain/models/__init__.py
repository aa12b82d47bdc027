"""Encoders (image, audio, text), the multimodal decoder and the model that ties them."""
from mmpretrain.models.model import MultimodalModel, build_model

__all__ = ["MultimodalModel", "build_model"]
