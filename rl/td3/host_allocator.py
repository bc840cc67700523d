"""glibc's malloc, set up for a learner that allocates and frees the same tensors every update.

By default glibc hands the top of its heap back to the kernel as soon as more than twice its
(self-adjusting) mmap threshold lies free there, and it serves blocks above that threshold with
their own mmap, unmapped again on free. An update frees all its activations and gradients at
its end and asks for them again at the next one, so every update faults its whole working set
back in, page by page, each page zeroed by the kernel first. Measured on 2 CPU cores, batch 256:
3,000-6,000 page faults per update of the CI-size CNN, none with the settings below; ~49,000
(200 MB) per update of the default CNN, ~7,000 with them (benchmarks/README.md has the speed).
PyTorch's CPU tuning guide gets the same by preloading jemalloc or tcmalloc; glibc's own knobs,
set at run time, need no library and no environment set before the process starts.
"""

from __future__ import annotations

import ctypes
import platform

# mallopt(3) parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3

# The largest mmap threshold glibc accepts on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): blocks below
# it come from the heap and are reused. Larger ones (a replay's arrays, a batch-1024 image
# tensor) still get their own mapping, returned to the kernel when freed.
MMAP_THRESHOLD_BYTES = 32 * 1024 * 1024
# Free memory at the top of a heap (each malloc arena has one) kept for the next update rather
# than returned. 256 MiB already leaves an update of the default CNN at batch 256 as few faults
# as 1 GiB does (measured); more would only hold memory that a pod's limit counts.
TRIM_THRESHOLD_BYTES = 256 * 1024 * 1024


def keep_freed_heap_for_reuse() -> bool:
    """Applies the settings to this process's malloc; True where it did (glibc), False elsewhere
    (macOS, musl), where the allocator's defaults stay."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return False
    libc = ctypes.CDLL(None)
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)) and bool(
        libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
