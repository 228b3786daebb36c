"""geoseg: semantic segmentation of large aerial and satellite rasters with SCG-Net."""

__version__ = "0.1.0"
