"""vqpipe: exactly-once tokenization of WebDataset image shards with VAR's multi-scale VQ-VAE."""

__version__ = "0.1.0"
