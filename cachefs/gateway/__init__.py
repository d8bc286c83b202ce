"""The HTTP and S3-compatible read gateway: the node's cache tiers served over HTTP."""
