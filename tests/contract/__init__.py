"""Conformance tests that every remote backend must pass, each against a real server."""
