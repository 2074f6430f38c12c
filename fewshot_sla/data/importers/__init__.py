"""Readers of the raw formats datasets are distributed in, one module per layout (see ``common.Layout``)."""
