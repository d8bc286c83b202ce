"""The FUSE client: the pyfuse3 layer, the mount daemon and its control.

`operations.py` turns FUSE requests into calls of `cachefs.fs.DatasetFS` (the file-system logic,
no FUSE import); `daemon.py` is the process behind one mount; `mount.py` starts, finds, asks
(with time limits) and stops daemons; `config.py` holds a mount's options; `helper.py` is
`mount.cachefs` for mount(8) and fstab.
"""
