"""Weight files: the canonical format, the safetensors/npz layer, the peers' formats and
starting weights."""
