"""The lock machinery: lock files, the in-process queue, flock, owner records, fork safety.

Nothing here imports :mod:`grex_locks._diagnostics`: the core takes and
releases locks; explaining who holds one is the layer above's business.
"""
