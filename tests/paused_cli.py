"""`tsvmerge` caught mid-write, for tests that signal, kill or race a real run:

    python paused_cli.py PAUSED GO [--slow-cleanup] ARGS...

After the first tensor is written the run creates the file PAUSED and waits until the file GO
exists (GO '-': forever, until signalled). --slow-cleanup makes removing a temporary output
take a second, after creating PAUSED.cleanup: time to press Ctrl-C again.

PAUSED holds the PID of the process that paused. Under torchrun with several processes each
rank pauses on its own file, PAUSED.rankR (R: its RANK), so that a test can find and signal
one rank.
"""
import os
import sys
import time

from tsvmerge.cli import main
from tsvmerge.io import publish, safetensors


def pause_after_first_write(paused: str, go: str):
    write = safetensors.SafetensorsWriter.write

    def paused_write(self, name, tensor):
        write(self, name, tensor)
        if not os.path.exists(paused):
            with open(paused + ".part", "w") as f:     # whole when it appears: a test reads the PID
                f.write(str(os.getpid()))
            os.replace(paused + ".part", paused)
            while not (go != "-" and os.path.exists(go)):
                time.sleep(0.02)

    safetensors.SafetensorsWriter.write = paused_write


def slow_cleanup(flag: str):
    remove = publish._remove

    def slow_remove(path):
        open(flag, "w").close()
        time.sleep(1.0)
        remove(path)

    publish._remove = slow_remove


if __name__ == "__main__":
    paused, go, *args = sys.argv[1:]
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        paused += f".rank{os.environ['RANK']}"
    pause_after_first_write(paused, go)
    if args[:1] == ["--slow-cleanup"]:
        slow_cleanup(paused + ".cleanup")
        args = args[1:]
    sys.exit(main(args))
