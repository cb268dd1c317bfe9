"""Data: VOC/SBD layout, synthetic scenes, webdataset shards, training and inference loaders."""
