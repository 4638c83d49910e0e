"""Data: LabelSets, the readers of data sets on disk, observation, images and loaders.

Importing the package imports the reader modules, each of which registers its kind in
:data:`mlic.registry.READERS` (``@register_reader("coco")``); ``mlic prepare KIND`` reads that table.
"""

from mlic.data import coco, cub, formatted, nuswide, openimages, table, voc  # noqa: F401  (each registers a reader)
