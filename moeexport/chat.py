"""`moeexport chat`: a local chat session that behaves as llama-cli and `ollama run` do.

Replies stream as they are generated; Ctrl-C stops a reply and returns to the prompt
(Ctrl-C twice at an empty prompt, Ctrl-D or /bye leave); lines are edited and recalled
with readline (history kept for the session, and in the cache directory between sessions);
keys typed while a reply streams are neither echoed into it nor sent as the next line.
"""

from __future__ import annotations

import math
import signal
import sys
from pathlib import Path

from moeexport.errors import ContextFull, MoeExportError

try:
    import termios
except ImportError:  # Windows: no terminal modes to set; typed-ahead keys are left to the console
    termios = None

HELP = """commands:
  /bye, /exit            leave (as do Ctrl-D and Ctrl-C twice at an empty prompt)
  /clear                 forget the conversation (the system message stays)
  /set temperature X     sample at temperature X (0: always the likeliest token)
  /help, /?              this list
Ctrl-C stops a reply; Up and Down recall earlier lines."""

HISTORY_LINES = 1000
CONTEXT_CAP = 4096  # the default context: the model's, at most this (a KV cache of 128k tokens is many GB)


def parse_temperature(text: str, what: str = "temperature") -> float:
    """A sampling temperature: a finite number at least 0, or one MoeExportError line naming `what` was given."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise MoeExportError(f"{what} must be a number at least 0 (e.g. 0.7), not {text!r}")
    return value


class _Keyboard:
    """While a reply streams, the terminal does not echo keys (Ctrl-C still interrupts: signals stay on), and
    what was typed is dropped when it ends, so that it neither mixes into the reply nor becomes the next line.
    Does nothing when stdin is not a terminal (piped input is the next lines, on purpose)."""

    def __init__(self, stdin):
        self.fd = stdin.fileno() if termios is not None and stdin.isatty() else None
        self.saved = None

    def __enter__(self):
        if self.fd is not None:
            self.saved = termios.tcgetattr(self.fd)
            quiet = termios.tcgetattr(self.fd)
            quiet[3] &= ~termios.ECHO  # lflag
            termios.tcsetattr(self.fd, termios.TCSANOW, quiet)
        return self

    def __exit__(self, *exc):
        if self.fd is not None:
            termios.tcflush(self.fd, termios.TCIFLUSH)
            termios.tcsetattr(self.fd, termios.TCSANOW, self.saved)
        return False


class _History:
    """readline's line editing and history for input(), kept in `path` between sessions when it is given."""

    def __init__(self, path: Path | None):
        try:
            import readline
        except ImportError:  # a Python built without it: plain input() still works
            self.readline = None
            return
        self.readline, self.path = readline, path
        readline.set_history_length(HISTORY_LINES)
        if path is not None and path.is_file():
            try:
                readline.read_history_file(path)
            except OSError:  # unreadable history is not worth refusing a chat over
                pass

    def save(self) -> None:
        if self.readline is None or self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.readline.write_history_file(self.path)
        except OSError:
            pass


def _typed_at_prompt() -> str:
    """The line being typed when Ctrl-C came (readline keeps it)."""
    try:
        import readline
    except ImportError:
        return ""
    return readline.get_line_buffer()


class ChatSession:
    """A conversation with a runner (`runner.chat(messages, max_tokens, temperature)` yields text pieces)."""

    def __init__(self, runner, system: str | None, max_tokens: int, temperature: float):
        self.runner, self.system, self.max_tokens, self.temperature = runner, system, max_tokens, temperature
        self.messages = self._start()

    def _start(self) -> list[dict]:
        return [{"role": "system", "content": self.system}] if self.system else []

    def note(self, text: str) -> None:
        print(text, file=sys.stderr, flush=True)

    def reply(self, text: str) -> None:
        """Stream the answer to `text`; Ctrl-C stops it, and the part shown stays in the conversation."""
        self.messages.append({"role": "user", "content": text})
        pieces = []
        try:
            with _Keyboard(sys.stdin):
                for piece in self.runner.chat(self.messages, max_tokens=self.max_tokens, temperature=self.temperature):
                    pieces.append(piece)
                    print(piece, end="", flush=True, file=sys.stdout)
        except KeyboardInterrupt:
            print(file=sys.stdout, flush=True)
            self.note("(stopped)")
        except ContextFull:
            self.messages.pop()  # unanswered: /clear, or a shorter line, may fit
            raise
        else:
            print(file=sys.stdout, flush=True)
        self.messages.append({"role": "assistant", "content": "".join(pieces)})

    def command(self, line: str) -> bool:
        """Run a /command; False when it ends the session."""
        words = line.split()
        if words[0] in ("/bye", "/exit"):
            return False
        if words[0] in ("/help", "/?"):
            self.note(HELP)
        elif words[0] == "/clear":
            self.messages = self._start()
            self.note("conversation cleared")
        elif words[0] == "/set" and len(words) == 3 and words[1] == "temperature":
            try:
                self.temperature = parse_temperature(words[2])
                self.note(f"temperature {self.temperature:g}")
            except MoeExportError as error:
                self.note(str(error))
        elif words[0] == "/set":
            self.note("usage: /set temperature X")
        else:
            self.note(f"unknown command {words[0]}: /help lists them")
        return True

    def run(self) -> None:
        """Read lines and answer them until /bye, Ctrl-D, or Ctrl-C twice in a row at the prompt."""
        interrupted = False
        while True:
            try:
                line = input("> ")
            except EOFError:
                print(file=sys.stdout)
                return
            except KeyboardInterrupt:
                print(file=sys.stdout)
                if _typed_at_prompt():  # Ctrl-C drops a half-typed line, as in a shell
                    interrupted = False
                    continue
                if interrupted:
                    return
                interrupted = True
                self.note("(Ctrl-C again, Ctrl-D or /bye to leave)")
                continue
            interrupted = False
            text = line.strip()
            if text.startswith("/"):
                if not self.command(text):
                    return
            elif text:
                try:
                    self.reply(line)
                except ContextFull as error:
                    self.note(str(error))


def chat_session(runner, prompt: str | None, system: str | None, max_tokens: int, temperature: float, name: str,
                 history: Path | None = None) -> None:
    """Answer one `prompt`, or each line typed until the session ends (history kept in `history`)."""
    session = ChatSession(runner, system, max_tokens, temperature)
    if prompt is not None:
        session.reply(prompt)
        return
    lines = _History(history)
    # Ctrl-C must reach the session as KeyboardInterrupt even where the parent ignored SIGINT (a job started in
    # the background of a script inherits that, and Python then leaves it ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    session.note(f"chatting with {name} ({runner.template}); /help for commands, Ctrl-C stops a reply, /bye leaves")
    try:
        session.run()
    finally:
        lines.save()
