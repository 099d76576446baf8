"""Run a GGUF in llama.cpp (through llama-cpp-python) behind moeexport's runner interface.

A file llama.cpp cannot parse, a batch llama.cpp refuses to run, NaN or infinite
logits while decoding, and a chat template (tokenizer.chat_template) that is not valid
Jinja are each one MoeExportError line naming the file, never a traceback from
llama.cpp or jinja2. `logits` returns non-finite values as they are: validation turns
them into a failed verdict.
"""

from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from moeexport.backends.decoding import TokenBytes, experts_read, next_token, speed_report
from moeexport.errors import ContextFull, MoeExportError
from moeexport.threads import default_threads

GGML_TYPE_F32 = 0  # KV-cache type for exactness checks
# The turns format of files without tokenizer.chat_template, instead of llama-cpp-python's Llama-2 [INST]
# fallback: ChatML, as llama-cli and llama-server use for such files. It is the runner's choice and is not written
# into files (a GGUF says what its model was trained with, or nothing; earlier files stay byte-identical).
DEFAULT_CHAT_FORMAT = "chatml"


def _load_error(path: str | Path) -> str:
    """llama.cpp's own reason for refusing a file (it only logs it): load again, verbosely, in a subprocess."""
    probe = f"from llama_cpp import Llama\nLlama(model_path={str(path)!r}, n_ctx=8, verbose=True)"
    log = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, errors="replace").stderr
    lines = log.splitlines()
    # the GGUF parser's first complaint is the cause; "failed to load model" after it says nothing more
    parser = [line.split(":", 1)[1].strip() for line in lines if line.startswith("gguf_init_from_")]
    if parser:
        return f"the file is damaged or not a GGUF ({parser[0]})"
    reasons = [line.split("error loading model:", 1)[1].strip() for line in lines if "error loading model:" in line]
    if not reasons:
        return "the file is damaged or not a GGUF file llama.cpp can read"
    if "corrupted" in reasons[-1] or "file bounds" in reasons[-1]:
        return f"the file is damaged or truncated ({reasons[-1]})"
    return reasons[-1]


def _template_error(path, error) -> MoeExportError:
    """A jinja2.TemplateError of the file's tokenizer.chat_template: where, what, and how to fix the file."""
    import jinja2

    syntax = isinstance(error, jinja2.TemplateSyntaxError)
    line = f" at line {error.lineno}" if syntax else ""
    what = "is malformed" if syntax else "fails on this conversation"
    return MoeExportError(
        f"{path}: its chat template (tokenizer.chat_template) {what}: "
        f"{(error.message or type(error).__name__).rstrip('.')}{line}; "
        "fix or remove it, e.g. with gguf-py's gguf_new_metadata.py --chat-template"
    )


class GGUFRunner:
    """`logits(token_ids) -> [T, vocab]` from llama.cpp.

    exact=True keeps the KV cache in F32 and flash attention off, so that an F32
    GGUF can be compared with the torch reference to ~1e-5, and reads the weights
    into memory instead of mapping them: llama.cpp repacks 4-bit weights for the
    CPU, and a mapped file then stays resident beside its repacked copy (a 2.0 GB
    q4_k_m file: 3.4 GB peak mapped, 2.2 GB read).
    """

    path = "the GGUF file"  # named in errors; set by __init__

    def __init__(
        self, path: str | Path, context: int = 512, exact: bool = True, threads: int | None = None, logits: bool = True
    ):
        try:
            import jinja2
            from llama_cpp import Llama
        except ImportError:
            raise MoeExportError("running GGUF files needs llama-cpp-python: pip install 'moeexport[gguf]'") from None
        self.path = str(path)
        options = {"flash_attn": False, "type_k": GGML_TYPE_F32, "type_v": GGML_TYPE_F32} if exact else {}
        try:
            self.llm = Llama(
                model_path=str(path),
                n_ctx=context,
                n_batch=context,
                n_ubatch=context,
                logits_all=logits,
                use_mmap=not exact,
                n_threads=threads or default_threads(),
                swa_full=False,  # our sliding windows never slide (step35 hosts): the cache is full-size anyway
                verbose=False,
                **options,
            )
        except jinja2.TemplateError as error:  # llama-cpp-python compiles the file's chat templates on load
            raise _template_error(path, error) from None
        except ValueError:
            raise MoeExportError(f"llama.cpp cannot load {path}: {_load_error(path)}") from None
        self.context = context
        if "tokenizer.chat_template" in self.llm.metadata:
            self.template = "the file's chat template"
        else:
            self.llm.chat_format = DEFAULT_CHAT_FORMAT
            self.template = "ChatML turns: the file has no chat template"

    def _eval(self, token_ids: list[int]) -> None:
        try:
            self.llm.eval(token_ids)
        except RuntimeError as error:  # llama_decode refused the batch: a token outside the vocabulary, ...
            vocabulary = self.llm.n_vocab()
            outside = sorted({t for t in token_ids if not 0 <= t < vocabulary})
            why = f"token ids {outside[:5]} are outside its vocabulary of {vocabulary}" if outside else str(error)
            raise MoeExportError(f"llama.cpp cannot run {self.path}: {why}") from None

    def _finite(self, scores: np.ndarray) -> np.ndarray:
        """The next token's logits, which decoding cannot sample from when they are not finite."""
        if not np.isfinite(scores).all():
            raise MoeExportError(
                f"{self.path} is damaged: llama.cpp computes NaN or infinite logits from it "
                "(its tensor data is corrupt, or the model overflows); re-export or re-download it"
            )
        return scores

    def logits(self, token_ids) -> np.ndarray:
        token_ids = [int(t) for t in token_ids]
        if len(token_ids) > self.context:
            raise MoeExportError(f"{len(token_ids)} tokens do not fit the runner's context of {self.context}")
        self.llm.reset()
        self._eval(token_ids)
        return np.array(self.llm.scores[: len(token_ids)], dtype=np.float32)

    def generate(self, prompt, max_new_tokens: int, temperature: float = 0.0, seed: int = 0) -> list[int]:
        """New token ids after `prompt` through the KV cache: greedy at temperature 0, else sampled."""
        self.llm.reset()
        self._eval([int(t) for t in prompt])
        return self._continue(max_new_tokens, temperature, np.random.default_rng(seed))

    def _continue(self, count: int, temperature: float, rng) -> list[int]:
        """Pick the next token from the last logits and feed it back, `count` times."""
        generated = []
        for _ in range(count):
            token = next_token(self._finite(self.llm.scores[self.llm.n_tokens - 1]), temperature, rng)
            generated.append(token)
            self._eval([token])
        return generated

    def profile(self, prompt: list[int], new_tokens: int = 64) -> dict:
        """Prefill and greedy-decode speed on this machine, as llama.cpp serves them."""
        prompt = [int(t) for t in prompt]
        self.generate(prompt[: min(len(prompt), 8)], 2)  # warm-up, as DecoderLoop.profile: lazy initialisation once
        self.llm.reset()
        started = time.perf_counter()
        self._eval(prompt)
        prefill = time.perf_counter() - started
        started = time.perf_counter()
        self._continue(new_tokens, 0.0, None)
        return speed_report(len(prompt), prefill, new_tokens, time.perf_counter() - started)

    def chat(self, messages: list[dict], max_tokens: int = 256, temperature: float = 0.7):
        """Stream the assistant's reply as text pieces, formatted by the file's chat template (ChatML turns when it
        has none). A conversation that no longer fits the context is ContextFull."""
        import jinja2

        try:
            stream = self.llm.create_chat_completion(
                messages=messages, max_tokens=max_tokens, temperature=temperature, stream=True
            )
            for chunk in stream:
                piece = chunk["choices"][0]["delta"].get("content")
                if piece:
                    yield piece
        except jinja2.TemplateError as error:  # the template compiled but fails on this conversation
            raise _template_error(self.path, error) from None
        except (ValueError, RuntimeError) as error:  # the template's raise_exception(), a full context, llama_decode
            if "exceed context window" in str(error):  # llama-cpp-python's words for a prompt that does not fit
                raise ContextFull(
                    f"the conversation no longer fits the context of {self.context} tokens: /clear starts a new "
                    "one (or chat with a larger --ctx-size)"
                ) from None
            raise MoeExportError(f"llama.cpp cannot answer with {self.path}: {error}") from None

    def close(self) -> None:
        self.llm.close()


@dataclass(frozen=True)
class TensorRead:
    """How decoding one token reads a tensor of a GGUF: whole (`head`: the output projection), `experts` (k of
    the `count` experts of a routed stack), `row` (one of its `count` rows: the token embedding) or `tied` (the
    token embedding of a file without an output projection: a row, and whole as the head)."""

    nbytes: int
    read: str = "whole"  # whole | head | experts | row | tied
    count: int = 1


def bytes_per_token(path: str | Path) -> TokenBytes:
    """The weight bytes llama.cpp reads to decode one token of the GGUF at `path`, from its tensor table.

    Every tensor is read whole, except the routed expert stacks blk.N.ffn_{gate,up,down}_exps, of which the
    k = {arch}.expert_used_count selected experts are read: k x (the stack's bytes / E), E its outermost axis
    (stacks are uniform; a padded layer's padding experts are never selected, and k real ones always are),
    and the token embedding, of which one row is read. The head (output.weight, or token_embd again when the
    file has none: tied) is read whole.
    """
    from moeexport.backends.gguf.reader import GGUFFile

    file = GGUFFile(path)
    return token_bytes(list(tensor_reads(file).values()), int(file.value("expert_used_count", 0) or 0))


def tensor_reads(file) -> dict[str, TensorRead]:
    """How decoding reads each tensor of a reader.GGUFFile (bytes_per_token's rule), by name."""
    import gguf

    from moeexport.backends.gguf.names import EXPERT_STACKS, TensorNames

    names = TensorNames(gguf, file.architecture)
    kinds = [kind for kind in EXPERT_STACKS if names.allowed is None or kind in names.allowed]
    routed = {names(kind, block, suffix="") for kind in kinds for block in range(int(file.value("block_count", 0)))}
    embedding, head = names("TOKEN_EMBD", suffix=""), names("OUTPUT", suffix="")
    tied = not any(name.rsplit(".", 1)[0] == head for name in file.tensors)
    reads = {}
    for name, tensor in file.tensors.items():
        stem = name.rsplit(".", 1)[0]
        if stem in routed:
            reads[name] = TensorRead(tensor.nbytes, "experts", tensor.shape[0])
        elif stem == embedding:
            reads[name] = TensorRead(tensor.nbytes, "tied" if tied else "row", tensor.shape[0])
        else:
            reads[name] = TensorRead(tensor.nbytes, "head" if stem == head else "whole")
    return reads


def token_bytes(reads: list[TensorRead], used: int) -> TokenBytes:
    """The bytes decoding one token reads of tensors read as `reads` say, routing to `used` experts per layer (the
    file's expert_used_count; 0: every expert)."""
    parts, pairs, rows = {"routed_experts": 0, "head": 0, "lookups": 0, "other": 0}, set(), 0
    for tensor in reads:
        if tensor.read == "experts":
            k = min(used or tensor.count, tensor.count)
            parts["routed_experts"] += k * (tensor.nbytes // tensor.count)
            pairs.add((k, tensor.count))
        elif tensor.read in ("row", "tied"):
            parts["lookups"] += tensor.nbytes // tensor.count  # one row per token
            parts["head"] += tensor.nbytes if tensor.read == "tied" else 0
            rows = max(rows, tensor.count)
        else:
            parts["head" if tensor.read == "head" else "other"] += tensor.nbytes
    return TokenBytes(**parts, experts_read=experts_read(pairs), embedding_rows=rows)
