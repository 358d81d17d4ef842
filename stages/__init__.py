"""One module per pipeline stage: read inputs, call the library in `pipeline`, write outputs."""
