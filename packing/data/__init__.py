"""Where documents come from: webdataset shards (``shards`` writes them, ``python -m
packing.data.shards``; ``shard_reader`` reads them, map-style or streaming), tokenizers for writing
(``tokenizer``), the seed article's synthetic documents (``synthetic``) and long documents cut to a
budget (``split``).

Nothing is imported here, so ``python -m packing.data.shards`` runs its module once; import from the
modules (``from packing.data.shard_reader import ShardDataset``).
"""
