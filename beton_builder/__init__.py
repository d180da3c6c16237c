"""Converts datasets in their published on-disk formats into FFCV .beton files with manifests.

Readers (cifar, tiny_imagenet, image_folder, arrays) each return an ImageTable in the canonical
order of docs/design.md §2; writer.write_beton turns a table into a .beton + manifest, atomically.
"""

BUILDER_VERSION = "3"
