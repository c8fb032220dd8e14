"""The chunked PyTorch implementation of the core (`impl="torch"`, any device, float64 included).

Open `tiled.py` first: the row tiles, their forward and backward. `dense.py` and `small_path.py` serve small
problems in one N×M buffer; `self_tiles.py` contrasts each block pair once when the queries are the keys;
`tile_workers.py` runs tiles on worker threads; `tile_operands.py` and `const_cache.py` are their helpers.
"""
