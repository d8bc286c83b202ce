"""The cache tiers of a mount: memory, local SSD and peers, in front of the origin (tiered.py).

`memory.py` is a byte-bounded LRU inside the mount daemon; `disk.py` the SSD tier, one directory
shared by every mount of a node; `tiered.py` asks memory, then disk, then peers, then the
origin, with single-flight fetches (`singleflight.py`), verification and the mount's counters;
`versions.py` records which versions a node's cache serves (read by the node inventory);
`peer.py` asks the owner of a chunk among the other nodes (`cachefs/peer/`). The interface of a
tier is `base.py`.
"""
