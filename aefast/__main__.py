import os
import sys

from aefast.cli import main
from aefast.train.distributed import launched_by_torchrun

code = main()
if launched_by_torchrun():
    # One process of a torchrun job, its run over and its process group destroyed:
    # gloo's static state can abort the interpreter's own exit ("terminate called
    # without an active exception", seen in CI after a finished run), which would turn
    # this exit code into SIGABRT. Leave without that teardown.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
raise SystemExit(code)
