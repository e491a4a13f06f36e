"""Imported at start-up by every Python process the tests launch (it is first on their PYTHONPATH).

SIGUSR2 writes every thread's stack to the process's stderr (the test's pipe), inherited by
pool children.  When a test fails, its cluster fixture signals each worker process and prints
what they were doing: a hung pool process shows where it hangs.
"""

import faulthandler
import signal

faulthandler.register(signal.SIGUSR2, all_threads=True, chain=False)
