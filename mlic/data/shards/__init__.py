"""WebDataset shards: pack a LabelSet into tar files and stream them back as :class:`ImageDataset` rows.

:mod:`.write` packs (``write_shards``, ``prepare_shards``), :mod:`.index` reads index.json (``ShardIndex``,
``open_data``), :mod:`.stream` streams (``ShardDataset``), :mod:`.tar` and :mod:`.row_code` hold the sample format.

A shard folder (one per split) holds::

    shard-000000.tar …  WebDataset tars; per sample (key = the 9-digit dataset row index):
                        <key>.<ext>          the image file's bytes as on disk (not re-encoded; its extension)
                        <key>.labels.json    {"index": row, "path": image path, "targets": row code,
                                              ["observed": row code]}  (code: :func:`encode_row`)
    index.json          {"format", "split", "classes", "num_rows", "shards": [names], "samples": [count per
                         shard], "observed", "skipped": [{"index", "path", "reason"}], "meta"}; written last
    labels/             the LabelSet itself (classes, clean and observed targets; its image root points at
                        the original images), so training has every label without reading a shard

Every shard and index.json is written atomically; ``mlic prepare shards`` builds the whole folder beside
its target and swaps it in, so an interrupted run leaves the previous shards as they were.

:class:`ShardDataset` streams the shards of a folder (or any URL webdataset's ``gopen`` opens: ``pipe:``,
``http(s)://``, …): each DDP rank, then each DataLoader worker, reads its own shards, samples pass a seeded
shuffle buffer, and images decode through :func:`mlic.data.images.read_image` with the caller's transform,
so a row is the same ``(uint8 image (3, S, S) or None, int8 targets (K,), index, error or None)`` as the folder
path gives and :func:`mlic.data.images.collate` takes it unchanged.
"""

from mlic.data.shards.index import ShardError, ShardIndex, is_shards, open_data
from mlic.data.shards.row_code import decode_row, encode_row
from mlic.data.shards.stream import ShardDataset
from mlic.data.shards.write import parse_size, prepare_shards, write_shards

__all__ = ["ShardDataset", "ShardError", "ShardIndex", "decode_row", "encode_row", "is_shards", "open_data",
           "parse_size", "prepare_shards", "write_shards"]
