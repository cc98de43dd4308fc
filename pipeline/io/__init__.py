"""Where bytes live: storage locations on any fsspec/pyarrow filesystem, and reading images."""
