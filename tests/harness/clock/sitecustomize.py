"""A wall clock set wrong, for a test's subprocess: put this folder first on PYTHONPATH and name a file
holding an offset in seconds in CRM_TEST_CLOCK_OFFSET_FILE (the Mac's clock set behind or ahead; it is
read at every call, so a test can correct it). It moves `time.time()` and `datetime.now()`; the monotonic
clock is left alone, as on a real Mac."""

import datetime as _dt
import os
import time

_offset_file = os.environ.get("CRM_TEST_CLOCK_OFFSET_FILE")
if _offset_file:
    _time, _time_ns = time.time, time.time_ns

    def _offset() -> float:
        try:
            with open(_offset_file) as f:
                return float(f.read().strip() or 0)
        except (OSError, ValueError):
            return 0.0

    time.time = lambda: _time() + _offset()
    time.time_ns = lambda: _time_ns() + int(_offset() * 1e9)

    class _Clock(_dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return _dt.datetime.fromtimestamp(time.time(), tz)

    _dt.datetime = _Clock
