"""Kept for imports written before ``resnetlab.sources``: ``load_model`` lives there now."""

from resnetlab.sources import load_model, resolve_source

__all__ = ["load_model", "resolve_source"]
