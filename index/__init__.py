"""sociable's index half: the SOCI formats, the OCI plumbing and the `sociable` build CLI.

This package imports nothing from `snapshotter`, and none of grpc or trio.
"""
