"""Training data: preprocessing to shards, augmentations and datasets."""
