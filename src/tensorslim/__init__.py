"""tensorslim: compress the weight matrices of neural networks without retraining."""

__version__ = "0.1.0"
