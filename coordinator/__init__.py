"""Coordinator side of moeshard: config, checkpoint reading, the dense model, routing, generation."""
from .api import Coordinator

__all__ = ["Coordinator"]
