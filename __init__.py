"""clipfuse: few-label image classification over a store of CLIP embeddings.

>>> import clipfuse
>>> ws = clipfuse.open("clipfuse.lance")  # doctest: +SKIP
"""

__version__ = "0.1.0"


def open(db="clipfuse.lance", **kwargs):  # the entry point, like lancedb.connect
    """Open the store at ``db`` as a :class:`clipfuse.workspace.Workspace` (see its methods)."""
    from clipfuse.workspace import Workspace

    return Workspace(db, **kwargs)


def __getattr__(name: str):
    if name == "Workspace":
        from clipfuse.workspace import Workspace

        return Workspace
    raise AttributeError(f"module 'clipfuse' has no attribute {name!r}")


__all__ = ["Workspace", "__version__", "open"]
