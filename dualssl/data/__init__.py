"""Data: dataset lists, checks, MONAI preprocessing, the shared on-disk cache and loaders.

Import the submodules you need (``dualssl.data.datalist``, ``.transforms``, ``.cache``,
``.loaders``, ``.verify``, ``.phantom``); nothing heavy is imported here.
"""
