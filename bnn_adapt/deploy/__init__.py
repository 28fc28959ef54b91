"""Deployment: the bit-packed base file, ``task=export`` and ``task=predict`` (one base, many adapters)."""
