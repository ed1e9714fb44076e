"""`mel` in a subprocess with a scripted engine: ``python -m tests.scripted_campaign [mel arguments]``.

For tests that need a campaign in a process of its own (killed mid-update, or polled by readers while it
writes) *and* a constructed situation: every runtime the process builds generates what
:class:`tests.scripted.Script` (the default: mixed groups, parseable analyses, replays that solve) says.
"""

import sys

from mel_app import cli
from mel_core.step import runtime
from tests.scripted import Script, ScriptedEngine

_init = runtime.Runtime.__init__


def _scripted_init(self, cfg):
    _init(self, cfg)
    self.use_engine(ScriptedEngine(lambda: self.policy.tokenizer, Script()))


if __name__ == "__main__":
    runtime.Runtime.__init__ = _scripted_init
    sys.exit(cli.main(sys.argv[1:]))
