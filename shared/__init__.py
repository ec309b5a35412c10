"""Understudy's wire protocol and client.

Standard library and pyzmq only: this package is vendored into the Blender extension.
"""
