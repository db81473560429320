"""Who holds a lock: the kernel's lock table checked against the owner record.

Diagnostics read; they never take a lock, create or change a file. The one
exception is ``doctor --prune`` (:mod:`.prune`), which removes a dead holder's
record while holding its lock for that instant.
"""
