"""tsvmerge: model merging with Task Singular Vectors, as a streamed, batched engine."""
__version__ = "0.1.0"
