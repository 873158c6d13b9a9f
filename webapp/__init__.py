"""The review app (``clipfuse serve``): a local web page over the store, a face over the workspace."""

from .app import create_app, is_loopback, serve

__all__ = ["create_app", "is_loopback", "serve"]
