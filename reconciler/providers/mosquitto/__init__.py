"""Mosquitto 2 with the dynamic-security plugin: the only package that imports paho."""
from .provider import MosquittoProvider

__all__ = ["MosquittoProvider"]
