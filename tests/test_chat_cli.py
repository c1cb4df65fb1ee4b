"""`edgelm chat` driven in a pseudo-terminal (pexpect): streaming replies, prompt_toolkit
history (Up arrow), Ctrl-C stopping a reply without exiting, /reset and /exit; and the
plain line mode used when stdin is not a terminal."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from conftest import ROOT, run_cli  # noqa: E402
from tiny_bundle import tiny_bundle  # noqa: E402

pexpect = pytest.importorskip("pexpect")

PROMPT = r"\x1b\[0m>"  # prompt_toolkit draws "> " as ">" plus a cursor move
REPLY_STARTED = r"\x1b\[\?2004l"  # prompt_toolkit hands the terminal back: the reply is under way


@pytest.fixture(scope="module")
def bundle():
    return tiny_bundle()


def spawn(bundle, *extra):
    env = dict(os.environ, PROMPT_TOOLKIT_NO_CPR="1", TERM="xterm", PYTHONUNBUFFERED="1")
    args = ["-m", "edgelm", "chat", "--model", str(bundle), "--max-tokens", "1024", "--temperature", "0", *extra]
    return pexpect.spawn(sys.executable, args, env=env, cwd=str(ROOT), encoding="utf-8", timeout=30,
                         dimensions=(40, 200))


def test_interactive_chat_streams_cancels_and_resets(bundle):
    p = spawn(bundle, "-n", "1000")
    try:
        p.expect("edgelm chat")
        p.expect(PROMPT)
        p.sendline("Hello world")
        p.expect(r"\[1000 tokens, [\d.]+ tok/s")  # a full reply, then its stats line
        p.expect(PROMPT)

        # Ctrl-C while the (1000-token) reply streams: it stops at once and the chat goes on.
        p.sendline("Gemma is a family")
        p.expect(REPLY_STARTED)
        p.expect(r"[a-z]{3}")
        p.sendintr()
        assert p.expect([r"\[stopped\]", r"\[1000 tokens"]) == 0, "Ctrl-C did not stop the reply"
        p.expect(r"\[(\d+) tokens")
        assert int(p.match.group(1)) < 1000
        p.expect(PROMPT)
        assert p.isalive()

        # history: Up recalls the last line
        p.send("\x1b[A")
        p.expect("Gemma is a family")
        p.send("\r")
        p.expect(r"\[\d+ tokens, [\d.]+ tok/s")
        p.expect(PROMPT)

        p.sendline("/reset")
        p.expect(r"\[new conversation\]")
        p.expect(PROMPT)
        p.sendline("/bogus")
        p.expect("unknown command /bogus")
        p.expect(PROMPT)
        p.sendline("/exit")
        p.expect(pexpect.EOF)
    finally:
        p.close(force=True)
    assert p.exitstatus == 0


def test_ctrl_d_exits(bundle):
    p = spawn(bundle)
    try:
        p.expect(PROMPT)
        p.sendcontrol("d")
        p.expect(pexpect.EOF)
    finally:
        p.close(force=True)
    assert p.exitstatus == 0


def test_piped_chat_and_reset(bundle):
    proc = run_cli("chat", "--model", bundle, "--max-tokens", "512", "--temperature", "0", "-n", "6",
                   "--system", "Be brief.", input="Hello world\n/reset\nHello world\n/exit\n", timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("[6 tokens") == 2 and "[new conversation]" in proc.stderr
    replies = [ln for ln in proc.stdout.splitlines() if ln.strip()]
    assert len(replies) == 2 and replies[0] == replies[1]  # after /reset the same first turn again


def test_chat_overflow_error_is_one_line_and_continues(bundle):
    proc = run_cli("chat", "--model", bundle, "--max-tokens", "64", "--temperature", "0", "-n", "8",
                   "--overflow", "error", "-q", input="Hello world\n" * 8, timeout=60)
    assert proc.returncode == 0
    assert "Traceback" not in proc.stderr
    errs = [ln for ln in proc.stderr.splitlines() if ln.startswith("edgelm: error:")]
    assert errs and all("no longer fits" in e for e in errs)
