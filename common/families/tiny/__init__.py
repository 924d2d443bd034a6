"""Tiny random-weight checkpoints of the real classes, built locally and saved in Hugging Face format (no download),
one module per editor; the tests, the demo and ``editrl make-tiny`` load them with ``from_pretrained``."""
