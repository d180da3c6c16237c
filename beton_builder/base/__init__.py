"""What beton_builder and the engine both build on: typed errors, atomic files and locks, process plumbing,
content digests, tables, safe pickles. Imports nothing of ccfs_fast."""
