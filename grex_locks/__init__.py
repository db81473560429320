"""grex_locks: grex's five-tier file locks, thread- and process-safe, with diagnostics.

The public API, documented in ``docs/`` (the reference is generated from these
names' docstrings). This module holds no logic.
"""

from loguru import logger

from ._core.owner_record import OWNER_SUFFIX
from ._core.primitive import Hold
from ._core.tiers import Tier, set_tier_check
from ._diagnostics.diagnose import diagnose
from ._diagnostics.diagnosis import Diagnosis, Holder, HolderState
from ._diagnostics.scan import ScanResult, WaitCycle, find_wait_cycles, scan
from ._version import __version__
from .errors import (
    LockBusy,
    LockCancelled,
    LockError,
    LockIOError,
    LockTimeout,
    TierOrderWarning,
    TierViolation,
    WorkspaceBusy,
)
from .group import HeldGroup, acquire_all
from .locks import (
    BACKEND_LOCK_SUFFIX,
    MANIFEST_LOCK_FILE_NAME,
    PACK_LOCK_FILE_NAME,
    SYNC_LOCK_FILE_NAME,
    BackendLock,
    LockStatistics,
    ManifestLock,
    PackLock,
    WorkspaceLock,
)
from .scheduler import Permit, PermitsBusy, PermitTimeout, Scheduler, SchedulerStatistics

# A library must not print into its users' programs: logging stays off until
# the application (or the grex-locks command line) enables "grex_locks".
logger.disable("grex_locks")

__all__ = [
    "BACKEND_LOCK_SUFFIX",
    "MANIFEST_LOCK_FILE_NAME",
    "OWNER_SUFFIX",
    "PACK_LOCK_FILE_NAME",
    "SYNC_LOCK_FILE_NAME",
    "BackendLock",
    "Diagnosis",
    "HeldGroup",
    "Hold",
    "Holder",
    "HolderState",
    "LockBusy",
    "LockCancelled",
    "LockError",
    "LockIOError",
    "LockStatistics",
    "LockTimeout",
    "ManifestLock",
    "PackLock",
    "Permit",
    "PermitTimeout",
    "PermitsBusy",
    "ScanResult",
    "Scheduler",
    "SchedulerStatistics",
    "Tier",
    "TierOrderWarning",
    "TierViolation",
    "WaitCycle",
    "WorkspaceBusy",
    "WorkspaceLock",
    "__version__",
    "acquire_all",
    "diagnose",
    "find_wait_cycles",
    "scan",
    "set_tier_check",
]
