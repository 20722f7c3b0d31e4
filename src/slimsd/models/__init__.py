"""Models: presets and recipes (data), student architectures, loading, compression, counting, micro models."""
