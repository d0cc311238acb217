"""HTTP inference service (FastAPI + uvicorn) with dynamic batching: ``resnetlab serve``."""

from resnetlab.serve.app import create_app, serve
from resnetlab.serve.batcher import DynamicBatcher

__all__ = ["DynamicBatcher", "create_app", "serve"]
