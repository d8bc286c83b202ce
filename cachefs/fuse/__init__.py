"""The FUSE client: the pyfuse3 layer, the mount daemon and its control."""
