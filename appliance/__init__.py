"""appliance: a single-box, low-latency AI inference appliance."""

__version__ = "0.1.0"
