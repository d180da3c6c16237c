"""The selection core: numpy and numba only (no torch, no I/O beyond score files): the selection kernels,
the coarse pass, score kinds, reach, forgetting events."""
