"""Peak resident memory of this process (the driver) and of its Ray processes, sampled."""

import os
import threading
import time


def _rss_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _descendants(root: int) -> list[int]:
    """Every process below ``root`` (the embedded Ray's GCS, raylet and workers)."""
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                with open(f"/proc/{name}/stat") as f:
                    parent = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(parent, []).append(int(name))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


class PeakMemory:
    """Samples driver RSS and the summed RSS of the driver's Ray processes every 0.2 s.

    Only processes started below this driver count (its embedded Ray), not other Ray clusters
    on the machine.
    """

    def __init__(self, interval: float = 0.2):
        self.interval = interval
        self.driver_peak = 0
        self.workers_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.driver_peak = max(self.driver_peak, _rss_bytes(os.getpid()))
            self.workers_peak = max(self.workers_peak,
                                    sum(_rss_bytes(p) for p in _descendants(os.getpid())))
            time.sleep(self.interval)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
