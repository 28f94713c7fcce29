"""One module per CLI command (as rasterio's ``rio``); each is a thin layer over the library.

Command modules must not import torch, timm, rasterio or other heavy packages at module level, so
``geoexplora --help`` stays fast.
"""
