"""`python tests/greedy.py SCRIPT ARGS...` runs `python SCRIPT ARGS...` with greedy sampling: common.generate's
default top_p set to 1e-6, so that only the most likely token is kept. The online scripts sample at temperature 1
with no option to change it; a test that compares runs whose samples must not depend on the per-rank seed (2
processes against 1) runs them through this file (with run_script, or as a job of run_in_one_process)."""

import inspect
import os
import runpy
import sys

sys.path.insert(0, os.getcwd())  # the repository, as when the script is run directly
import common  # noqa: E402

generate = inspect.unwrap(common.generate)  # the function inside torch.no_grad()'s wrapper
defaults = generate.__defaults__  # (temperature, top_p): the scripts pass neither
generate.__defaults__ = (1.0, 1e-6)
sys.argv = sys.argv[1:]
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:  # run_in_one_process: the next job in this interpreter samples as usual
    generate.__defaults__ = defaults
