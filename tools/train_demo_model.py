#!/usr/bin/env python3
"""Train the small Mixtral-architecture demo model bundled in ``moeexport/demo/``.

What it makes (all in ``--out``, default ``moeexport/demo``):

* ``tokenizer.model``: a SentencePiece BPE tokenizer (2048 pieces, byte fallback,
  digits split, unk=0, bos=1 ``<s>``, eos=2 ``</s>``, no pad) trained on the corpus;
* ``tokenizer.json`` + ``tokenizer_config.json``: the same tokenizer for
  ``transformers.AutoTokenizer`` (a Llama-style fast tokenizer);
* ``config.json``, ``generation_config.json``, ``model.safetensors``: a
  ``MixtralForCausalLM`` (4 layers, hidden 128, 8 experts, top-2 routing, about
  3.1 M float32 parameters, under 16 MB) trained briefly on the corpus with a
  load-balancing loss, so that every expert of every layer is actually used;
* ``TRAINING.json`` (steps, held-out loss, parameter count, tokens seen, the
  arguments) and ``README.md`` (a description of the model).

No text of the corpus is written to ``--out``.

How to run it, from the repository root (CPU only, 2 threads)::

    python tools/train_demo_model.py                  # 15-minute budget
    python tools/train_demo_model.py --minutes 2      # a quick smoke run
    python tools/train_demo_model.py --steps 50 --out /tmp/demo

Training stops at whichever comes first of ``--minutes`` (wall clock) and
``--steps``. The learning-rate schedule is driven by the fraction of that budget
already spent, so a run cut short by the clock still ends its cosine decay.
After saving, the script reloads the directory with ``AutoModelForCausalLM`` and
``AutoTokenizer``, checks the logits are finite, and prints how the held-out
tokens are routed among the experts of each layer.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaTokenizer,
    MixtralConfig,
    MixtralForCausalLM,
)
from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func
from transformers.tokenization_utils_base import generate_merges
from transformers.utils import logging as hf_logging

REPO_ROOT = Path(__file__).resolve().parent.parent

UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
MAX_MODEL_FILE_BYTES = 16_000_000  # the bundled model must stay small enough to ship in the package
ROUND_TRIP_SAMPLE = "The 3 doctors met on 12 May 1881, and Holmes said: \"It's élémentaire!\""


# --------------------------------------------------------------------------- arguments


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--corpus", default="../shared/corpus/train.txt",
                        help="training text; a relative path is taken from the repository root")
    parser.add_argument("--out", default="moeexport/demo",
                        help="output directory; a relative path is taken from the repository root")
    parser.add_argument("--minutes", type=float, default=15.0, help="wall-clock budget for the training loop")
    parser.add_argument("--steps", type=int, default=5000, help="maximum number of optimizer steps")
    parser.add_argument("--seed", type=int, default=0)
    # model sizes
    parser.add_argument("--vocab", type=int, default=2048, help="SentencePiece vocabulary size")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--experts-per-tok", type=int, default=2)
    parser.add_argument("--ffn", type=int, default=192, help="intermediate size of each expert")
    # training
    parser.add_argument("--seq", type=int, default=256, help="tokens per training window (BOS included)")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    parser.add_argument("--warmup", type=int, default=30, help="linear warm-up steps")
    parser.add_argument("--balance", type=float, default=0.05,
                        help="weight of each layer's router load-balancing loss")
    parser.add_argument("--held-out", type=float, default=0.02, help="fraction of the corpus tokens held out")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=25)
    return parser.parse_args(argv)


def resolve_from_repo(path: str) -> Path:
    p = Path(path)
    return p if p.is_absolute() else (REPO_ROOT / p).resolve()


# --------------------------------------------------------------------------- tokenizer


def train_sentencepiece(corpus: Path, out_dir: Path, vocab_size: int, seed: int) -> Path:
    """Train the BPE model and copy only ``tokenizer.model`` into ``out_dir``."""
    # BPE training reads every line and is deterministic; the seed only matters if sampling is on.
    spm.set_random_generator_seed(seed)
    with tempfile.TemporaryDirectory() as tmp:
        prefix = Path(tmp) / "tokenizer"
        spm.SentencePieceTrainer.train(
            input=str(corpus),
            model_prefix=str(prefix),
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,  # no text is ever <unk>: unseen characters become UTF-8 byte pieces
            split_digits=True,
            unk_id=UNK_ID, bos_id=BOS_ID, eos_id=EOS_ID, pad_id=-1,
            # Keep text as it is (no NFKC, no whitespace squeezing), because the transformers
            # tokenizer built from this model has no normalizer: both must agree.
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            character_coverage=0.9995,
            max_sentence_length=32768,  # a few corpus lines (tables) are long; keep them
            num_threads=2,
            minloglevel=2,
        )
        target = out_dir / "tokenizer.model"
        shutil.copyfile(f"{prefix}.model", target)  # the .vocab side file is not needed
    return target


def build_transformers_tokenizer(sp_model: Path, max_length: int) -> LlamaTokenizer:
    """Slow->fast conversion without protobuf: read the pieces through the sentencepiece
    runtime and derive the BPE merges the same way transformers' SentencePieceExtractor does."""
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    vocab = {sp.id_to_piece(i): i for i in range(sp.get_piece_size())}
    return LlamaTokenizer(
        vocab=vocab,
        merges=generate_merges(vocab),
        model_max_length=max_length,
        add_bos_token=True,  # like Llama/Mixtral: encode() starts with <s>
        add_eos_token=False,
    )


def check_round_trip(tokenizer, sp_model: Path) -> None:
    sp = spm.SentencePieceProcessor(model_file=str(sp_model))
    ids = tokenizer(ROUND_TRIP_SAMPLE)["input_ids"]
    decoded = tokenizer.decode(ids, skip_special_tokens=True)
    assert ids[0] == BOS_ID, ids
    assert decoded == ROUND_TRIP_SAMPLE, (decoded, ROUND_TRIP_SAMPLE)
    assert ids[1:] == sp.encode(ROUND_TRIP_SAMPLE), "tokenizer.json disagrees with tokenizer.model"
    print(f"tokenizer round trip ok: {len(ids)} tokens, {tokenizer.convert_ids_to_tokens(ids[:8])} ...")


def encode_corpus(tokenizer, corpus: Path, held_out_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The whole corpus as one token stream (encoded in one piece, so it is tokenized exactly
    as a long document would be at inference), split into a training head and a held-out tail."""
    text = corpus.read_text(encoding="utf-8")
    # The backend tokenizer skips the "longer than model_max_length" warning; no BOS in the stream.
    ids = tokenizer.backend_tokenizer.encode(text, add_special_tokens=False).ids
    stream = torch.tensor(ids, dtype=torch.long)
    split = int(len(stream) * (1.0 - held_out_fraction))
    print(f"corpus: {len(text):,} characters -> {len(stream):,} tokens "
          f"({len(text) / len(stream):.2f} chars/token); held out the last {len(stream) - split:,}")
    return stream[:split], stream[split:]


# --------------------------------------------------------------------------- model


def build_model(args: argparse.Namespace) -> MixtralForCausalLM:
    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.ffn,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        num_local_experts=args.experts,
        num_experts_per_tok=args.experts_per_tok,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
        pad_token_id=None,
        # Training-time settings; reset to inference defaults before saving.
        output_router_logits=True,
        router_aux_loss_coef=args.balance,
        dtype="float32",
    )
    return MixtralForCausalLM(config).to(torch.float32)


def count_parameters(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    # Weight decay on matrices only; norm gains (1-D) are left alone, as is usual.
    matrices = [p for p in model.parameters() if p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": matrices, "weight_decay": 0.1}, {"params": vectors, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step: int, progress: float, peak: float, warmup: int) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to 10% of peak over the budget.
    ``progress`` (0..1) is the fraction of the step *or* time budget spent, whichever is larger."""
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0))))


def sample_batch(stream: torch.Tensor, batch: int, seq: int, generator: torch.Generator) -> torch.Tensor:
    """Random windows of the training stream, each prefixed with <s> as the tokenizer does."""
    starts = torch.randint(0, len(stream) - seq, (batch,), generator=generator)
    body = torch.stack([stream[s:s + seq - 1] for s in starts.tolist()])
    return torch.cat([torch.full((batch, 1), BOS_ID, dtype=torch.long), body], dim=1)


def held_out_windows(stream: torch.Tensor, seq: int) -> torch.Tensor:
    """Non-overlapping <s>-prefixed windows covering the held-out tail."""
    n = len(stream) // (seq - 1)
    body = stream[: n * (seq - 1)].view(n, seq - 1)
    return torch.cat([torch.full((n, 1), BOS_ID, dtype=torch.long), body], dim=1)


# --------------------------------------------------------------------------- training


def train(model, train_stream: torch.Tensor, eval_windows: torch.Tensor, args) -> dict:
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = make_optimizer(model, args.lr)
    budget_s = args.minutes * 60.0
    coef = model.config.router_aux_loss_coef
    num_layers = model.config.num_hidden_layers
    start = time.monotonic()
    step = 0
    model.train()
    while step < args.steps:
        elapsed = time.monotonic() - start
        if elapsed >= budget_s:
            break
        progress = max(step / args.steps, elapsed / budget_s)
        lr = learning_rate(step, progress, args.lr, args.warmup)
        for group in optimizer.param_groups:
            group["lr"] = lr

        batch = sample_batch(train_stream, args.batch, args.seq, generator)
        out = model(input_ids=batch, output_router_logits=True)
        lm_loss = next_token_loss(out.logits, batch)
        balance_loss = per_layer_balance_loss(out.router_logits, model.config)
        loss = lm_loss + coef * balance_loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1

        if step % args.log_every == 0 or step == 1:
            print(f"step {step:5d}  {elapsed / 60:5.1f} min  lr {lr:.2e}  lm loss {lm_loss.item():.3f}  "
                  f"balance loss/layer {balance_loss.item() / num_layers:.3f}", flush=True)
        if step % (args.log_every * 8) == 0:
            print(f"           held-out loss (16 windows) {evaluate(model, eval_windows[:16]):.3f}", flush=True)
            model.train()

    wall_s = time.monotonic() - start
    print(f"trained {step} steps in {wall_s / 60:.1f} min ({wall_s / max(step, 1):.2f} s/step)")
    return {"steps": step, "train_wall_s": round(wall_s, 1), "tokens_seen": step * args.batch * args.seq}


def next_token_loss(logits: torch.Tensor, tokens: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.size(-1)).float(), tokens[:, 1:].reshape(-1), reduction=reduction)


def per_layer_balance_loss(router_logits: tuple[torch.Tensor, ...], config: MixtralConfig) -> torch.Tensor:
    """Sum over layers of the Switch-Transformer load-balancing loss (2.0 per layer when balanced).

    The model's own aux loss feeds all layers' router logits into one statistic, which only
    balances "expert e summed over layers": a layer may then starve some experts while another
    layer overuses them. Applying the same function to each layer separately keeps every
    expert of every layer in use, as in real Mixtral checkpoints."""
    return sum(
        load_balancing_loss_func((layer_logits,), config.num_local_experts, config.num_experts_per_tok)
        for layer_logits in router_logits
    )


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, batch: int = 16) -> float:
    """Mean next-token cross-entropy (LM loss only) over the windows."""
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        chunk = windows[i:i + batch]
        logits = model(input_ids=chunk, output_router_logits=False).logits
        total += next_token_loss(logits, chunk, reduction="sum").item()
        count += chunk[:, 1:].numel()
    return total / count


@torch.no_grad()
def expert_usage(model, windows: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """Fraction of routing decisions (top-k slots) each expert takes, per layer: [layers, experts]."""
    model.eval()
    cfg = model.config
    counts = torch.zeros(cfg.num_hidden_layers, cfg.num_local_experts)
    for i in range(0, len(windows), batch):
        out = model(input_ids=windows[i:i + batch], output_router_logits=True)
        for layer, logits in enumerate(out.router_logits):
            chosen = logits.topk(cfg.num_experts_per_tok, dim=-1).indices.flatten()
            counts[layer] += torch.bincount(chosen, minlength=cfg.num_local_experts).float()
    return counts / counts.sum(dim=1, keepdim=True)


def print_expert_usage(usage: torch.Tensor) -> None:
    print("expert usage on held-out text (share of each layer's routing decisions):")
    print("         " + " ".join(f"  e{e:<3d}" for e in range(usage.size(1))))
    for layer, row in enumerate(usage):
        print(f"layer {layer:2d} " + " ".join(f"{100 * v:5.1f}%" for v in row.tolist()))


# --------------------------------------------------------------------------- saving


def save_model(model, out_dir: Path) -> None:
    # Inference defaults in the shipped config: no router logits, no aux loss term.
    model.config.output_router_logits = False
    model.config.router_aux_loss_coef = 0.0
    model.router_aux_loss_coef = 0.0
    model.save_pretrained(out_dir, safe_serialization=True)  # config, generation_config, model.safetensors
    weights = out_dir / "model.safetensors"
    weights.chmod(0o644)  # save_pretrained leaves it owner-only (0600); it is a shipped package file
    size = weights.stat().st_size
    assert size <= MAX_MODEL_FILE_BYTES, f"model.safetensors is {size:,} bytes, over {MAX_MODEL_FILE_BYTES:,}"
    print(f"saved {weights} ({size / 1e6:.2f} MB)")


def write_training_json(out_dir: Path, record: dict) -> None:
    (out_dir / "TRAINING.json").write_text(json.dumps(record, indent=1) + "\n")


def write_readme(out_dir: Path, args, record: dict, usage: torch.Tensor) -> None:
    params_m = record["params"] / 1e6
    lo, hi = 100 * usage.min().item(), 100 * usage.max().item()
    text = f"""# moeexport demo model

A very small Mixtral-architecture MoE language model with real trained weights, bundled with
moeexport so that the toolchain can be tried and tested end to end without downloading anything.
It writes plausible-looking English words, not sense: it exists to be compressed and exported.

- Architecture: MixtralForCausalLM, {args.layers} layers, hidden {args.hidden}, {args.heads} attention heads
  ({args.kv_heads} KV heads), {args.experts} experts per layer (intermediate {args.ffn}), top-{args.experts_per_tok}
  routing, RoPE theta 10000, untied embeddings; {params_m:.2f} M parameters, float32 safetensors.
- Tokenizer: SentencePiece BPE, {args.vocab} pieces, byte fallback, digits split, no normalization
  (tokenizer.model; tokenizer.json + tokenizer_config.json for transformers). bos=1 `<s>`, eos=2 `</s>`,
  unk=0, no pad token.
- Training: {record['steps']} steps x {args.batch} x {args.seq} tokens ({record['tokens_seen'] / 1e6:.2f} M tokens) of
  shared/corpus/train.txt (public-domain books) on {args.threads} CPU threads in {record['train_wall_s'] / 60:.1f} min;
  AdamW, peak lr {args.lr:g}, cosine, with a per-layer load-balancing loss (weight {args.balance:g} each) so that every
  expert of every layer is used, as in real Mixtral: on held-out text each expert takes {lo:.1f}-{hi:.1f}% of its
  layer's routing decisions (a uniform router would give {100 / args.experts:.1f}%).
- Held-out loss {record['held_out_loss']:.3f} (perplexity {record['held_out_perplexity']}) on the last
  {100 * args.held_out:g}% of the corpus tokens ({record['held_out_windows']} windows of {args.seq}), which training never saw.
  For scale, a uniform guess over the vocabulary scores ln({args.vocab}) = {math.log(args.vocab):.2f}.

Regenerate with `python tools/train_demo_model.py` (see TRAINING.json for the arguments used).
"""
    (out_dir / "README.md").write_text(text)


# --------------------------------------------------------------------------- verification


@torch.no_grad()
def verify_saved(out_dir: Path, eval_windows: torch.Tensor) -> torch.Tensor:
    """Reload the directory the way users will, and check it is sound. Returns expert usage."""
    model = AutoModelForCausalLM.from_pretrained(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(out_dir)
    llama_tokenizer = LlamaTokenizer.from_pretrained(out_dir)
    print(f"reloaded {type(model).__name__} and {type(tokenizer).__name__} "
          f"(LlamaTokenizer.from_pretrained gives {type(llama_tokenizer).__name__})")
    assert not model.config.output_router_logits and model.config.router_aux_loss_coef == 0.0
    # AutoTokenizer picks the generic tokenizers backend for model_type "mixtral"; both read
    # the same tokenizer.json and must agree.
    ids = tokenizer(ROUND_TRIP_SAMPLE)["input_ids"]
    assert ids == llama_tokenizer(ROUND_TRIP_SAMPLE)["input_ids"]
    assert tokenizer.decode(ids, skip_special_tokens=True) == ROUND_TRIP_SAMPLE

    logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), model.config.vocab_size), logits.shape
    assert torch.isfinite(logits).all(), "non-finite logits"
    print(f"forward pass ok: logits {tuple(logits.shape)}, finite")

    usage = expert_usage(model, eval_windows)
    print_expert_usage(usage)
    unused = [(layer, e) for layer in range(usage.size(0)) for e in range(usage.size(1)) if usage[layer, e] == 0]
    assert not unused, f"experts that received no tokens (layer, expert): {unused}"
    print(f"every expert is used: min share {100 * usage.min():.1f}%, max {100 * usage.max():.1f}%")
    return usage


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    hf_logging.disable_progress_bar()  # keep the log to our own progress lines
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    corpus = resolve_from_repo(args.corpus)
    out_dir = resolve_from_repo(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    print(f"corpus {corpus}\nout    {out_dir}")

    # Step 1: tokenizer
    sp_model = train_sentencepiece(corpus, out_dir, args.vocab, args.seed)
    tokenizer = build_transformers_tokenizer(sp_model, max_length=2048)
    check_round_trip(tokenizer, sp_model)
    tokenizer.save_pretrained(out_dir)  # tokenizer.json + tokenizer_config.json
    train_stream, held_out_stream = encode_corpus(tokenizer, corpus, args.held_out)
    eval_windows = held_out_windows(held_out_stream, args.seq)

    # Step 2: model
    model = build_model(args)
    params = count_parameters(model)
    assert params * 4 <= MAX_MODEL_FILE_BYTES, f"{params:,} float32 parameters will not fit in 16 MB"
    print(f"model: {params:,} parameters ({params * 4 / 1e6:.2f} MB float32)")

    run = train(model, train_stream, eval_windows, args)
    held_out_loss = evaluate(model, eval_windows)
    print(f"final held-out loss {held_out_loss:.4f} (perplexity {math.exp(held_out_loss):.1f}) "
          f"on {len(eval_windows)} windows of {args.seq} tokens")

    save_model(model, out_dir)
    usage = verify_saved(out_dir, eval_windows)

    record = {
        "steps": run["steps"],
        "held_out_loss": round(held_out_loss, 4),
        "held_out_perplexity": round(math.exp(held_out_loss), 2),
        "held_out_windows": len(eval_windows),
        "params": params,
        "tokens_seen": run["tokens_seen"],
        "train_wall_s": run["train_wall_s"],
        "train_tokens": len(train_stream),
        "held_out_tokens": len(held_out_stream),
        "expert_usage": [[round(v, 4) for v in row] for row in usage.tolist()],
        "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__,
                     "sentencepiece": spm.__version__},
        "args": vars(args),
    }
    write_training_json(out_dir, record)
    write_readme(out_dir, args, record, usage)
    print("wrote " + ", ".join(sorted(p.name for p in out_dir.iterdir())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
