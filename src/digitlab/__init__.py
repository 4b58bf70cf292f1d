"""digitlab: train, evaluate, explain and serve CNNs for handwritten digits."""

__version__ = "0.1.0"
