"""Shared package of the VLM serving pair: wire stubs, tensor codec, domain types, plumbing."""

__version__ = "0.1.0"
