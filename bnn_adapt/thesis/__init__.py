"""Reproducing the thesis: its tables, columns beside its printed values, claims, figures, sizes and plan."""
