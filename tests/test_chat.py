"""`moeexport chat` as people use llama-cli and `ollama run`: driven through a pseudo-terminal (Ctrl-C stops a
reply, /bye and Ctrl-C twice leave with 0, Up recalls a line, typed-ahead keys stay out of the reply), the
context it runs with, and the chat template every GGUF carries from its tokenizer."""

from __future__ import annotations

import json
import os
import pty
import re
import select
import shutil
import signal
import sys
import time
from pathlib import Path

import pytest

import moeexport
from moeexport.backends import gguf as gguf_backend
from moeexport.checkpoint_files import DEMO_MODEL
from moeexport.cli import main
from tests.cli_output import without_progress

TIMEOUT = 60  # seconds for any one thing the session should print: the machine may be loaded
UP = "\x1b[A"
CTRL_C = "\x03"
TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>{% endif %}")


class Terminal:
    """`moeexport chat ARGS` with a pseudo-terminal as its controlling terminal: what a user types and sees."""

    def __init__(self, args: list[str], cache: Path):
        env = {**os.environ, "MOEEXPORT_CACHE": str(cache), "TERM": "xterm", "INPUTRC": os.devnull}
        self.pid, self.fd = pty.fork()
        if self.pid == 0:  # the child: the chat, whose stdin, stdout and stderr are the terminal
            os.execve(sys.executable, [sys.executable, "-m", "moeexport.cli", "chat", *args], env)
        self.screen, self.read_to = b"", 0

    def expect(self, pattern: str, timeout: float = TIMEOUT) -> re.Match:
        """Wait for `pattern` in what the terminal shows after the previous match; consume up to its end."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.compile(pattern.encode(), re.S).search(self.screen, self.read_to)
            if found:
                self.read_to = found.end()
                return found
            left = deadline - time.monotonic()
            assert left > 0, f"no {pattern!r} in {self.screen[self.read_to:]!r}"
            if select.select([self.fd], [], [], left)[0]:
                try:
                    chunk = os.read(self.fd, 4096)
                except OSError:  # the child closed the terminal
                    chunk = b""
                assert chunk, f"the chat ended before {pattern!r}: {self.screen[self.read_to:]!r}"
                self.screen += chunk

    def type(self, keys: str) -> None:
        os.write(self.fd, keys.encode())

    def exit_code(self, timeout: float = TIMEOUT) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if select.select([self.fd], [], [], 0.1)[0]:  # drain, so that the child never blocks writing
                try:
                    self.screen += os.read(self.fd, 4096)
                except OSError:
                    pass
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
        os.kill(self.pid, signal.SIGKILL)
        os.waitpid(self.pid, 0)
        raise AssertionError(f"the chat did not end: {self.screen[self.read_to:]!r}")

    def close(self) -> None:
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):  # it had ended
            pass
        os.close(self.fd)


@pytest.fixture
def terminal(demo_gguf_of, tmp_path):
    opened = []

    def start(*flags: str) -> Terminal:
        opened.append(Terminal([str(demo_gguf_of("f32")), "--threads", "1", *flags], tmp_path / "cache"))
        return opened[-1]

    yield start
    for chat in opened:
        chat.close()


PROMPT = r"\n> "  # the prompt at the start of a line


def test_ctrl_c_stops_a_reply_and_typed_ahead_keys_stay_out_of_the_next_one(terminal):
    # at temperature 0 the demo model writes its full 300 tokens: seconds, long enough to interrupt
    chat = terminal("--temperature", "0", "--max-tokens", "300")
    chat.expect(r"/help for commands.*?" + PROMPT)
    chat.type("Tell me a story\r")
    chat.expect(r"Tell me a story\r\n[^\r]")  # the echoed line, then the reply streams
    chat.type(CTRL_C)
    chat.expect(r"\(stopped\)\r\n> ")  # the reply ends at once and the prompt comes back
    chat.type("Hello there\r")
    chat.expect(r"Hello there\r\n[^\r]")
    chat.type("zzqq typed ahead\r")  # while the reply streams: neither shown nor sent as the next line
    reply = chat.expect(r"(.*?)\r\n> ").group(1)
    assert len(reply) > 100 and b"(stopped)" not in reply  # the whole second answer
    chat.type("/bye\r")
    assert chat.exit_code() == 0
    assert b"zzqq" not in chat.screen


def test_up_recalls_the_last_line_and_bad_settings_are_one_line(terminal, tmp_path):
    chat = terminal("--max-tokens", "4")
    chat.expect(PROMPT)
    chat.type("/set temperature abc\r")
    refusal = r"temperature must be a number at least 0 \(e\.g\. 0\.7\), not 'abc'\r\n> "
    chat.expect(r"/set temperature abc\r\n" + refusal)
    chat.type(UP + "\r")  # the same line again, from readline's history
    chat.expect(r"/set temperature abc\r\n" + refusal)
    chat.type("/set temperature 0\r")
    chat.expect(r"temperature 0\r\n> ")
    chat.type("/help\r")
    chat.expect(r"/bye .*/clear .*/set temperature X .*" + PROMPT)
    chat.type("/clear\r")
    chat.expect(r"conversation cleared\r\n> ")
    chat.type(CTRL_C)
    chat.expect(r"Ctrl-C again, Ctrl-D or /bye to leave.*?> ")
    chat.type(CTRL_C)
    assert chat.exit_code() == 0
    history = (tmp_path / "cache" / "chat_history").read_text().splitlines()  # for the next session's Up
    assert history == ["/set temperature abc", "/set temperature 0", "/help", "/clear"]  # a repeat is kept once
