import atexit
import os
import sys
import threading

from kdsearch.cli import main

code = main()
if threading.active_count() == 1:
    # Exit without the interpreter's teardown, which frees torch's, MLflow's and pandas' objects one by one: 2 s
    # after a digits study. The exit handlers (logging's, MLflow's, multiprocessing's) still run.
    atexit._run_exitfuncs()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
sys.exit(code)
