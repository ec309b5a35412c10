"""The extension's rules, in plain Python: nothing here imports bpy, so every rule is
unit-tested without Blender. The Blender modules gather plain values (frame numbers,
channels, names, a server's replies), ask a rule what to do, and carry it out.
"""
