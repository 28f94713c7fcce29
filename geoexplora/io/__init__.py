"""Reading scenes, chips datasets and writing rasters."""
