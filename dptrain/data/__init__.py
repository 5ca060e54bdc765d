"""Stage 1, the data: a source -> class-indexed shards + index -> a K-class x n-per-class
subset. `sources` (the input layouts), `images` (what shard stores: checked, decoded,
converted), `shards` (the writer), `index` (the on-disk format), `verify` (is a set what its
index says), `subset` (K x n selection, epoch order, rank split), `datakey` (what a set's data
is: the key caches are filed under), `synthetic` (the built-in two-step dataset) and
`imagenet_like` (ImageNet-like JPEGs for benchmarks and tests)."""
