"""clipfuse: few-label image classification over a store of CLIP embeddings."""

__version__ = "0.1.0"
