"""Quality of a (compressed) model on held-out text: perplexity, and against a reference
model KL(reference || model) and top-1 agreement, all per predicted token.

Windows are the first `max_sequences` non-overlapping windows of the text, so
two runs on the same text compare the same tokens.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn.functional as F

from moeexport.calibration.sources import read_documents, token_stream, token_windows
from moeexport.validate import RecordedReference, perplexity


@dataclass
class EvalResult:
    tokens: int  # predicted tokens scored
    perplexity: float
    reference_perplexity: float | None = None
    kl: float | None = None  # mean KL(reference || model) in nats per token
    top1_agreement: float | None = None  # share of positions where both models' argmax agree

    def to_dict(self) -> dict:
        return asdict(self)


def eval_windows(tokenizer, text_source: str, sequence_length: int = 256, max_sequences: int = 32) -> torch.Tensor:
    stream = token_stream(tokenizer, read_documents(text_source), limit=sequence_length * max_sequences)
    available = len(stream) // sequence_length
    return token_windows(stream, sequence_length, min(max_sequences, max(available, 1)), None, text_source)


@torch.no_grad()
def evaluate(model, windows: torch.Tensor, reference=None, batch_size: int = 4, progress=None) -> EvalResult:
    """Score `model` on token windows [N, L], and compare it with `reference`: a torch model, or the
    RecordedReference of one's logits on these windows (so the original need not stay in memory)."""
    nll = reference_nll = kl = 0.0
    agree = count = 0
    task = progress.add_task("evaluating", total=len(windows)) if progress else None
    for batch in windows.split(batch_size):
        targets = batch[:, 1:].reshape(-1)
        log_probs = _log_probs(model, batch)
        nll += F.nll_loss(log_probs, targets, reduction="sum").item()
        count += targets.numel()
        if reference is not None:
            reference_log_probs = _log_probs(reference, batch)
            reference_nll += F.nll_loss(reference_log_probs, targets, reduction="sum").item()
            kl += F.kl_div(log_probs, reference_log_probs, log_target=True, reduction="sum").item()
            agree += (log_probs.argmax(-1) == reference_log_probs.argmax(-1)).sum().item()
        if progress:
            progress.advance(task, len(batch))
    result = EvalResult(tokens=count, perplexity=perplexity(nll, count))
    if reference is not None:
        result.reference_perplexity = perplexity(reference_nll, count)
        result.kl = kl / count
        result.top1_agreement = agree / count
    return result


def _log_probs(model, batch: torch.Tensor) -> torch.Tensor:
    """Log-probabilities of the next token at every position but the last: [N*(L-1), vocab]."""
    if isinstance(model, RecordedReference):
        logits = torch.from_numpy(np.stack([model.logits(window) for window in batch.tolist()]))[:, :-1]
    else:
        logits = model(input_ids=batch, use_cache=False).logits[:, :-1].float()
    return logits.log_softmax(-1).reshape(-1, logits.shape[-1])
