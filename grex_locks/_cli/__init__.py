"""The ``grex-locks`` command line: who, scan, doctor, run."""
