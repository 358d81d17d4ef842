"""Where bytes live: paths and URLs (`storage`), guarded outputs (`outputs`), one writer at a time (`locks`).

The bottom of the package: it imports nothing of the project but `errors`.
"""
