"""Run a command and report its own wait status and peak RSS: ``python -S own_rusage.py REPORT COMMAND...``.

The kernel's peak RSS of a child (``ru_maxrss`` from ``wait4``, VmHWM) starts from the high-water mark of
the process it was forked from: fork copies the memory map with its high-water mark, and exec keeps the old
map's mark in the process's ``maxrss``. A trial forked from a test process that had grown to 600 MiB would
report at least 600 MiB. This launcher is exec'd fresh from that process and is small; the command it forks
starts from the launcher's image, so ``ru_maxrss`` is the command's own (plus the launcher's few MiB, far
below any trial's). Standard library only, run without site-packages (``-S``): nothing of it weighs.

REPORT gets ``{"pid": ...}`` once the command started (whose VmHWM the harness polls), then
``{"pid", "status", "maxrss_kib"}`` once it ended. The launcher exits with the command's exit code (128 +
signal for a signal).
"""

import json
import os
import sys


def write(path: str, record: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="ascii") as report:
        json.dump(record, report)
    os.replace(temporary, path)  # the harness never reads half a record


def main(argv: list[str]) -> int:
    report, command = argv[0], argv[1:]
    pid = os.fork()
    if pid == 0:
        try:
            os.execvp(command[0], command)
        finally:
            os._exit(127)  # exec failed: the shell's code for a command not found
    write(report, {"pid": pid})
    _, status, usage = os.wait4(pid, 0)
    write(report, {"pid": pid, "status": status, "maxrss_kib": usage.ru_maxrss})
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
