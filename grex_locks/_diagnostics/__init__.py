"""Who holds a lock: the kernel's lock table checked against the owner record.

Diagnostics read; they never take a lock, create or change a file.
"""
