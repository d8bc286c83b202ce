"""The cache tiers of a mount: memory and local SSD, in front of the origin (tiered.py).

`memory.py` is a byte-bounded LRU inside the mount daemon; `disk.py` the SSD tier, one directory
shared by every mount of a node; `tiered.py` asks memory, then disk, then the origin, with
single-flight fetches (`singleflight.py`), verification and the mount's counters; `versions.py`
records which versions a node's cache serves (read by the node inventory). The interface of a
tier is `base.py`. A peer tier (other cachefs nodes' caches) is designed in docs/design.md but
not built yet.
"""
