"""Pure: the model memory profile, the GPU inventory and placement. No I/O."""
