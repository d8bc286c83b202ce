"""csi: placeholder package; built in a later issue (see docs/design.md)."""
