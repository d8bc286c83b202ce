"""The peer tier's network side: the ring of members, the peer server and its client.

The tier itself (what a mount asks between its SSD tier and the origin) is
`cachefs/cache/peer.py`; docs/design.md, "Cache tiers" (peers), has the rules.
"""
