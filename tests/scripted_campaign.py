"""`mel` in a subprocess with a scripted engine: ``python -m tests.scripted_campaign [mel arguments]``.

For tests that need a campaign in a process of its own (killed mid-update, or polled by readers while it
writes) *and* a constructed situation: every runtime the process builds generates what
:class:`tests.scripted.Script` (the default: mixed groups, parseable analyses, replays that solve) says.
"""

import os
import sys
import time

from mel_app import cli
from mel_core.model import async_save
from mel_core.step import runtime
from tests.scripted import Script, ScriptedEngine

# MEL_TEST_SAVE_PAUSE=<seconds>: every background checkpoint write (run.async_save) fills its temp directory, then
# waits that long before the rename: a process killed meanwhile dies mid-save, at a moment the test chooses.
PAUSE = float(os.environ.get("MEL_TEST_SAVE_PAUSE", 0))
_write = async_save._write


def _paused_write(path, write):
    return _write(path, lambda tmp: (write(tmp), time.sleep(PAUSE)))

_init = runtime.Runtime.__init__


def _scripted_init(self, cfg):
    _init(self, cfg)
    self.use_engine(ScriptedEngine(lambda: self.policy.tokenizer, Script()))


if __name__ == "__main__":
    runtime.Runtime.__init__ = _scripted_init
    if PAUSE:
        async_save._write = _paused_write
    sys.exit(cli.main(sys.argv[1:]))
