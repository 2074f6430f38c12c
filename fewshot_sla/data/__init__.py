"""Datasets: the HDF5 store, raw-format importers, the synthetic set, split conventions (see ``store``)."""
