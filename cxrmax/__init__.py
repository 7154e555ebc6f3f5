"""cxrmax: multi-source reasoning alignment for radiology (CXR-MAX data, drift, APO training, leaderboard)."""

__version__ = "0.1.0"
