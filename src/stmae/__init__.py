"""stmae: Siamese Transition Masked Autoencoders for unsupervised visual anomaly detection."""

__version__ = "0.1.0"
