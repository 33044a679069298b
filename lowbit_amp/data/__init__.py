"""Training data that needs no download (the running Python's standard-library sources)."""

from lowbit_amp.data.stdlib_text import BatchSampler, ByteCorpus, load_stdlib_corpus, read_stdlib_bytes, stdlib_files

__all__ = ["BatchSampler", "ByteCorpus", "load_stdlib_corpus", "read_stdlib_bytes", "stdlib_files"]
