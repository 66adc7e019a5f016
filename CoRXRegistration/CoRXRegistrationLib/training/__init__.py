"""Unsupervised training of CoRX networks: data preparation, augmentation, the resumable loop."""
