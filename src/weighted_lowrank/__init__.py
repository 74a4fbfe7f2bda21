"""weighted-lowrank: importance-weighted low-rank compression of fine-tuned transformers."""

__version__ = "0.1.0"
