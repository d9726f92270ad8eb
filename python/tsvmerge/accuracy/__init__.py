"""Merge-accuracy benchmark on real data: a small open_clip-named ViT fine-tuned on digit tasks.

Run it with `tsvmerge demo` or `python -m tsvmerge.accuracy`.
"""
