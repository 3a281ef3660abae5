"""The lazy reader: a layer's bytes fetched span by span, verified, inflated and cached.

- `spans`: the span state table and `RemoteLayerReader`, the `LayerReader` of lazy layers.
- `sources`: the `BlobSource` seam (where span bytes come from) and its registry source.
- `cache`: the span cache on disk (compressed spans) and the inflated tier.
- `background`: background fetch of mounted layers while the link is idle.

See docs/architecture.md for the life of one FUSE read.
"""
