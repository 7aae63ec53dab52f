"""Backends of the `salr::bitmap_linear` op: `reference` (plain torch), `cpu` (native extension), `triton_bitmap`
(GPU). The op itself lives in salr.sparse.ops."""
