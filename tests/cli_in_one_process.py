"""Several `lightning-rlhf` commands in one subprocess, one after the other (each process spends seconds importing)."""

import json
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# each command as `lightning-rlhf ...` would run it; a command that raises leaves its traceback and the next goes on
EACH_COMMAND = """
import contextlib, io, json, sys, traceback
from lightning_rlhf.cli import main
commands, sys.argv[1:] = json.loads(sys.argv[1]), []  # LightningCLI warns when given args beside sys.argv's
results = []
for args in commands:
    stderr, code = io.StringIO(), 0
    with contextlib.redirect_stderr(stderr):
        try:
            main(args)
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            code = "raised"
            traceback.print_exc()
    results.append({"code": code, "stderr": stderr.getvalue()})
print(json.dumps(results))
"""


def run_each(commands: list[list[str]], timeout: float) -> list[dict]:
    """Run each command's arguments through the CLI's ``main`` in one subprocess with a timeout; for each, its
    exit code (0 when it returned, ``"raised"`` with the traceback in its stderr) and what it wrote to stderr."""
    out = subprocess.run(
        [sys.executable, "-c", EACH_COMMAND, json.dumps(commands)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.splitlines()[-1])
