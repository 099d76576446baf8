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
SETTLE = 0.5  # seconds for the terminal to finish echoing before a signal key
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
    # at temperature 0 the demo model writes its full 1500 tokens: seconds, long enough to interrupt however fast
    # the machine (a 200-token reply could end before the key arrived)
    chat = terminal("--temperature", "0", "--max-tokens", "1500")
    chat.expect(r"/help for commands.*?" + PROMPT)
    chat.type("Tell me a story\r")
    chat.expect(r"Tell me a story\r\n[^\r]")  # the echoed line, then the reply streams
    chat.type(CTRL_C)
    chat.expect(r"\(stopped\)\r\n> ")  # the reply ends at once and the prompt comes back
    chat.type("/clear\r")  # room in the context for another whole reply
    chat.expect(r"conversation cleared\r\n> ")
    chat.type("Hello there\r")
    chat.expect(r"Hello there\r\n[^\r]")
    chat.type("zzqq typed ahead\r")  # while the reply streams: neither shown nor sent as the next line
    reply = chat.expect(r"(.*?)\r\n> ").group(1)
    assert len(reply) > 100 and b"(stopped)" not in reply  # the whole second answer
    chat.type("/bye\r")
    assert chat.exit_code() == 0
    assert b"zzqq" not in chat.screen


def test_up_recalls_lines_of_this_and_earlier_sessions_and_bad_settings_are_one_line(terminal, tmp_path):
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "chat_history").write_text("/set temperature 0.25\n")  # an earlier session's
    chat = terminal("--max-tokens", "4")
    chat.expect(PROMPT)
    chat.type(UP + "\r")
    chat.expect(r"/set temperature 0\.25\r\ntemperature 0\.25\r\n> ")
    chat.type("/set temperature abc\r")
    refusal = r"temperature must be a number at least 0 \(e\.g\. 0\.7\), not 'abc'\r\n> "
    chat.expect(r"/set temperature abc\r\n" + refusal)
    chat.type(UP + "\r")  # the same line again, from readline's history
    chat.expect(r"/set temperature abc\r\n" + refusal)
    chat.type("/set temperature 0\r")
    chat.expect(r"temperature 0\r\n> ")
    chat.type("/help\r")
    chat.expect(r"/bye, /exit .*/clear .*/set temperature X .*/help, /\? .*" + PROMPT)
    chat.type("/clear\r")
    chat.expect(r"conversation cleared\r\n> ")
    chat.type("half a line")
    chat.expect("half a line")
    time.sleep(SETTLE)  # readline redraws after each key; a signal in the middle of that waits for the next key
    chat.type(CTRL_C)  # drops the line, as in a shell: it is not the first of two to leave
    chat.expect(r"\r\n> ")
    chat.type(CTRL_C)
    chat.expect(r"Ctrl-C again, Ctrl-D or /bye to leave.*?> ")
    chat.type(CTRL_C)
    assert chat.exit_code() == 0
    assert chat.screen.count(b"Ctrl-C again") == 1
    history = (tmp_path / "cache" / "chat_history").read_text().splitlines()  # for the next session's Up
    assert history == ["/set temperature 0.25", "/set temperature abc", "/set temperature 0", "/help", "/clear"]  # a repeat is kept once


def test_a_missing_file_is_one_line(tmp_path, capsys):
    missing = tmp_path / "nowhere.gguf"
    assert main(["chat", str(missing), "--prompt", "hi"]) == 2
    assert without_progress(capsys.readouterr().err) == f"moeexport chat: error: {missing}: no such file"


@pytest.mark.parametrize("value", ["-1", "nan"])
def test_a_bad_temperature_is_one_line(value, demo_gguf_of, capsys):
    assert main(["chat", str(demo_gguf_of("f32")), "--temperature", value, "--prompt", "hi"]) == 2
    assert without_progress(capsys.readouterr().err) == (
        f"moeexport chat: error: --temperature must be a number at least 0 (e.g. 0.7), not '{float(value)}'")


def _with_context_length(demo_gguf, out: Path, tokens: int) -> None:
    import gguf
    from gguf.scripts.gguf_new_metadata import MetadataDetails, copy_with_new_metadata

    reader = gguf.GGUFReader(demo_gguf)
    writer = gguf.GGUFWriter(out, arch="llama", endianess=reader.endianess)
    copy_with_new_metadata(reader, writer, {"llama.context_length": MetadataDetails(gguf.GGUFValueType.UINT32,
                                                                                      tokens)}, [])


@pytest.mark.parametrize(("model_context", "flags", "expected"), [
    (2048, [], 2048), (2048, ["--ctx-size", "512"], 512), (32768, [], 4096), (32768, ["-c", "8192"], 8192)])
def test_the_context_is_the_model_s_at_most_4096_unless_asked(model_context, flags, expected, demo_gguf_of, tmp_path,
                                                               monkeypatch, capsys):
    model = demo_gguf_of("f32")
    if model_context != 2048:  # the demo model's
        model = tmp_path / "long.gguf"
        _with_context_length(demo_gguf_of("f32"), model, model_context)
    runners, real = [], gguf_backend.GGUFRunner
    monkeypatch.setattr(gguf_backend, "GGUFRunner", lambda *args, **kwargs: runners.append(real(*args, **kwargs))
                        or runners[-1])
    assert main(["chat", str(model), "--prompt", "Hi", "--max-tokens", "2", "--threads", "1", *flags]) == 0
    assert [runner.llm.n_ctx() for runner in runners] == [expected]


def _demo_checkpoint_with_template(directory: Path, where: str) -> Path:
    """The demo checkpoint with TEMPLATE in tokenizer_config.json, or in chat_template.jinja (transformers 5)."""
    shutil.copytree(DEMO_MODEL, directory)
    if where == "chat_template.jinja":
        (directory / "chat_template.jinja").write_text(TEMPLATE)
    else:
        config = json.loads((directory / "tokenizer_config.json").read_text())
        (directory / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": TEMPLATE}))
    return directory


def _chat_template(path: Path) -> str | None:
    import gguf

    field = gguf.GGUFReader(path).get_field("tokenizer.chat_template")
    return None if field is None else field.contents()


@pytest.fixture(scope="module")
def templated_gguf(tmp_path_factory):
    directory = _demo_checkpoint_with_template(tmp_path_factory.mktemp("templated") / "model", "chat_template.jinja")
    return gguf_backend.export(moeexport.load(directory), directory.parent / "model.gguf").path


def test_a_chat_template_in_tokenizer_config_is_written_into_the_gguf(tmp_path):
    directory = _demo_checkpoint_with_template(tmp_path / "model", "tokenizer_config.json")
    assert _chat_template(gguf_backend.export(moeexport.load(directory), tmp_path / "m.gguf").path) == TEMPLATE


def test_a_chat_template_jinja_file_is_written_into_the_gguf_and_carried_gguf_to_gguf(templated_gguf, tmp_path,
                                                                                       demo_gguf_of):
    assert _chat_template(templated_gguf) == TEMPLATE
    again = gguf_backend.export(moeexport.load(templated_gguf), tmp_path / "again.gguf", quant="q8_0").path
    assert _chat_template(again) == TEMPLATE
    assert _chat_template(demo_gguf_of("f32")) is None  # no template is made up for a model without one


def _prompt_of_a_turn(path: Path) -> str:
    """The text llama.cpp is given for a system message and one user line."""
    runner = gguf_backend.TARGET.chat_runner(path, 256, threads=1)
    prompts, complete = [], runner.llm.create_completion
    runner.llm.create_completion = lambda prompt, **kwargs: prompts.append(prompt) or complete(prompt, **kwargs)
    list(runner.chat([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}], max_tokens=2))
    # a file's template is rendered to token ids; SentencePiece decodes them with a leading space
    text = prompts[0] if isinstance(prompts[0], str) else runner.llm.detokenize(prompts[0]).decode().lstrip(" ")
    runner.close()
    return text


def test_a_file_s_template_formats_the_turns_and_chatml_does_without_one(templated_gguf, demo_gguf_of):
    assert _prompt_of_a_turn(templated_gguf) == "<|system|>Be brief.\n<|user|>Hello\n<|assistant|>"
    chatml = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n"
    assert _prompt_of_a_turn(demo_gguf_of("f32")) == chatml  # not llama-cpp-python's Llama-2 [INST] fallback


def test_a_conversation_that_fills_the_context_is_one_line_and_clear_starts_over(demo_gguf_of, monkeypatch, capsys):
    lines, turns, chat = iter(["Hello", "And then?", "/clear", "Hi"]), [], gguf_backend.GGUFRunner.chat

    def typed(prompt):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None

    def recorded(runner, messages, **kwargs):  # the users' lines each turn sends, and how many pieces came back
        turns.append([[m["content"] for m in messages if m["role"] == "user"], 0])
        for piece in chat(runner, messages, **kwargs):
            turns[-1][1] += 1
            yield piece

    monkeypatch.setattr("builtins.input", typed)
    monkeypatch.setattr(gguf_backend.GGUFRunner, "chat", recorded)
    # at temperature 0 the first reply runs until the 256-token context is full
    assert main(["chat", str(demo_gguf_of("f32")), "--ctx-size", "256", "--max-tokens", "1000", "--temperature", "0",
                 "--threads", "1"]) == 0
    full = "the conversation no longer fits the context of 256 tokens: /clear starts a new one (or chat with a larger "
    assert without_progress(capsys.readouterr().err).count(full) == 1
    assert [users for users, _ in turns] == [["Hello"], ["Hello", "And then?"], ["Hi"]]
    assert turns[0][1] > 100 and turns[1][1] == 0 and turns[2][1] > 0
