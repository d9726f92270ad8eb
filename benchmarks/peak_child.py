"""Run Python code as a child would (`peak_child.py SCRIPT ARGS...`, `-m MODULE ARGS...` or
`-c CODE ARGS...`) and, at exit, write this process's peak RSS in bytes (VmHWM) to the file
named by $RECORDING_PEAK_FILE. `recording.run_child` starts Python children through it: the
ru_maxrss that wait4 gives includes the parent's high-water mark, which Linux folds into a
child's at exec (a parent holding a 3 GB zoo makes every child read >= 3 GB)."""
import atexit
import os
import runpy
import sys


def vm_hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024


def _write_peak():
    with open(os.environ["RECORDING_PEAK_FILE"], "w") as f:
        f.write(str(vm_hwm_bytes()))


def main():
    atexit.register(_write_peak)
    mode, target, *rest = sys.argv[1:]
    if mode == "-m":
        sys.argv = [target, *rest]
        runpy.run_module(target, run_name="__main__", alter_sys=True)
    elif mode == "-c":
        sys.argv = ["-c", *rest]
        exec(compile(target, "<string>", "exec"), {"__name__": "__main__"})
    else:
        sys.argv = [mode, target, *rest]
        sys.path[0] = os.path.dirname(os.path.abspath(mode))
        runpy.run_path(mode, run_name="__main__")


if __name__ == "__main__":
    main()
