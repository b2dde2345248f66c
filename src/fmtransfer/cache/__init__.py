"""Teacher-output cache: sharded .npy store, layer capture by module path, cached encoders."""
