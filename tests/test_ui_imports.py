"""The UI is a client of the gateway's HTTP API only: it imports none of the other rooms."""

from __future__ import annotations

import subprocess
import sys

from conftest import ROOT


def test_ui_imports_no_other_room():
    code = ("import sys, ui.app, loopchat.commands.ui; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'serve', 'train', 'feedback'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
