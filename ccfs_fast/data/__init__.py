"""Data: .beton readers over index subsets, the pool + distilled index space, loaders, augmentation,
normalisation, thread sizing."""
