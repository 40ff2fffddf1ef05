"""Shards, two-view crops, masks and the WebDataset stream (the data's way to the device)."""
