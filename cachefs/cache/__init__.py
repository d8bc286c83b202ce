"""The cache tiers of a mount: memory, local SSD (disk), peers, composed by tiered.py."""
