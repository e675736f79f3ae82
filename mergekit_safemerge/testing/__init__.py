"""Support for tests, demos and benchmarks: tiny offline models (no model hub, no download)."""
