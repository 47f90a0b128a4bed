"""Source models of the micro world: specs, training (a plain torch loop), held-out bits per byte.

Each source is a tiny causal LM of its own transformers model_type and its own tokenizer, trained mainly
(`TrainSizes.own_fraction` of the characters) on its specialty domain, so that each source has the lowest
held-out bits per byte on its own domain, as the paper's domain-specialised sources do.
"""
from __future__ import annotations

import json
import math
import random
import sys
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from fusion.windows import plan_windows

from .corpus import DOMAINS
from .tokenizer import train_tokenizer


@dataclass(frozen=True)
class SourceSpec:
    """One source model: architecture, tokenizer convention and size, and its specialty domain."""

    name: str
    model_type: str       # transformers model_type: "llama", "gpt_neox", "mpt" (or "gpt2")
    domain: str           # the domain it is trained mainly on
    tokenizer_kind: str   # "sentencepiece" ("▁") or "byte_level" ("Ġ")
    vocab_size: int
    hidden: int
    layers: int
    heads: int


# The paper's pool (Llama-2 target, OpenLLaMA, MPT) in miniature; the target is the Llama one.
# MPT takes arithmetic: its ALiBi (relative) positions learn the worked problems' digit copying within this
# budget, where a GPT-2 (learned absolute positions) did not beat the code source's 7.5% arithmetic exposure
# (validation bits/byte 1.15 vs 1.19; MPT 0.77).
SOURCE_SPECS: tuple[SourceSpec, ...] = (
    SourceSpec("llama-docs", "llama", "docs", "sentencepiece", 1024, hidden=96, layers=3, heads=4),
    SourceSpec("neox-code", "gpt_neox", "code", "byte_level", 768, hidden=96, layers=3, heads=4),
    SourceSpec("mpt-arithmetic", "mpt", "arithmetic", "byte_level", 512, hidden=96, layers=3, heads=4),
)
TARGET_NAME = "llama-docs"


@dataclass(frozen=True)
class TrainSizes:
    """Training budget of every source: `steps` optimizer steps of `batch` x `seq_len` tokens
    (`target_steps` for the target, `TARGET_NAME`)."""

    seq_len: int = 256
    batch: int = 8
    steps: int = 240
    # The target is the docs model and the base FuseLLM continues from: at 240 steps it was no better than
    # neox-code on any docs task (spelling, word order); at 400 steps (and 0.95 docs) its validation docs
    # bits/byte fell from 2.45 to 2.13 against neox-code's 2.85. It trains last alone, inside the build budget.
    target_steps: int = 400
    lr: float = 1e-2
    warmup_steps: int = 20
    weight_decay: float = 0.1
    # share of the training characters from the source's own domain; at 0.85 every source saw enough of the
    # others' text to tie with their specialist on its tasks
    own_fraction: float = 0.95

    def steps_of(self, name: str) -> int:
        """Optimizer steps of the source called `name`."""
        return self.target_steps if name == TARGET_NAME else self.steps


def model_config(spec: SourceSpec, tokenizer, seq_len: int):
    """A transformers config for `spec`, vocabulary sized to `tokenizer`, context `seq_len` tokens, no dropout."""
    from transformers import AutoConfig

    common = dict(vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    h, n_layers, n_heads = spec.hidden, spec.layers, spec.heads
    if spec.model_type == "llama":
        return AutoConfig.for_model("llama", hidden_size=h, intermediate_size=2 * h + h // 2, num_hidden_layers=n_layers,
                                    num_attention_heads=n_heads, num_key_value_heads=n_heads,
                                    max_position_embeddings=seq_len, tie_word_embeddings=False, **common)
    if spec.model_type == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=h, intermediate_size=4 * h, num_hidden_layers=n_layers,
                                    num_attention_heads=n_heads, max_position_embeddings=seq_len, rotary_pct=0.5,
                                    hidden_dropout=0.0, attention_dropout=0.0, **common)
    if spec.model_type == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=h, n_layer=n_layers, n_head=n_heads, n_positions=seq_len,
                                    resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **common)
    if spec.model_type == "mpt":
        return AutoConfig.for_model("mpt", d_model=h, n_layers=n_layers, n_heads=n_heads, max_seq_len=seq_len,
                                    expansion_ratio=4, resid_pdrop=0.0, emb_pdrop=0.0,
                                    attn_config={"alibi": True}, **common)
    raise ValueError(f"source {spec.name!r}: unsupported model_type {spec.model_type!r}; "
                     "use 'llama', 'gpt_neox', 'gpt2' or 'mpt'")


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh]


def training_mix(spec: SourceSpec, train_rows: list[dict], seed: int, own_fraction: float,
                 mix_of: str | None = None) -> list[str]:
    """All of the source's own-domain train documents plus a seeded sample of the other domains,
    sized so that they make up ``1 - own_fraction`` of the characters, split evenly between them.
    mix_of: draw the sample of the source of that name instead (same domain: the same mix, so the same
    tokenizer), e.g. for a wider teacher of the target."""
    rng = random.Random(f"mix:{seed}:{mix_of or spec.name}")
    own = [r["text"] for r in train_rows if r["domain"] == spec.domain]
    own_chars = sum(len(t) for t in own)
    others = [d for d in DOMAINS if d != spec.domain]
    per_other = own_chars * (1 - own_fraction) / own_fraction / len(others)
    mix = list(own)
    for domain in others:
        pool = [r["text"] for r in train_rows if r["domain"] == domain]
        rng.shuffle(pool)
        taken = 0
        for text in pool:
            if taken >= per_other:
                break
            mix.append(text)
            taken += len(text)
    rng.shuffle(mix)
    return mix


def _token_blocks(tokenizer, texts: list[str], seq_len: int) -> torch.Tensor:
    """Documents tokenized (no BOS, EOS appended), concatenated, cut into [n_blocks, seq_len] int64."""
    stream: list[int] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        stream.extend(encoding.ids)
        stream.append(tokenizer.eos_token_id)
    n_blocks = len(stream) // seq_len
    return torch.tensor(stream[: n_blocks * seq_len], dtype=torch.long).view(n_blocks, seq_len)


@torch.no_grad()
def heldout_bits_per_byte(model, tokenizer, texts: list[str], seq_len: int, batch: int = 16) -> float:
    """Bits per byte of `texts`: sum of next-token nats / (ln 2 * utf-8 bytes), all texts pooled.

    Each text is tokenized without BOS and with EOS appended; token 0 is not predicted, every later
    token (EOS included) is, in non-overlapping windows of `seq_len` predictions: FuseLab's strided windows
    (fusion.windows) of seq_len + 1 positions with stride seq_len, each scoring every target it holds.
    """
    windows: list[torch.Tensor] = []
    for encoding in tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False):
        ids = torch.tensor(encoding.ids + [tokenizer.eos_token_id], dtype=torch.long)
        for start, end, _ in plan_windows(len(ids), seq_len + 1, seq_len, "strided"):
            windows.append(ids[start:end])
    total_nats = 0.0
    windows.sort(key=len)  # equal lengths side by side -> dense batches without padding
    i = 0
    while i < len(windows):
        j = i
        while j < len(windows) and j - i < batch and len(windows[j]) == len(windows[i]):
            j += 1
        chunk = torch.stack(windows[i:j])
        logits = model(input_ids=chunk[:, :-1]).logits.float()
        nats = torch.nn.functional.cross_entropy(logits.transpose(1, 2), chunk[:, 1:], reduction="sum")
        total_nats += float(nats)
        i = j
    n_bytes = sum(len(t.encode("utf-8")) for t in texts)
    return total_nats / (math.log(2) * n_bytes)


def _seed_everything(model_seed: int) -> None:
    """One thread, deterministic algorithms, and Python's, torch's (and numpy's) RNGs seeded with `model_seed`."""
    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    random.seed(model_seed)
    torch.manual_seed(model_seed)
    try:
        import numpy as np

        np.random.seed(model_seed % 2**32)
    except ImportError:  # numpy is not needed here; seeded only for code that might use it
        pass


def _optimizer(model, sizes: TrainSizes, steps: int):
    """AdamW (weight decay on matrices only) and its schedule: linear warmup, then cosine down to 0.1 x lr."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": sizes.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=sizes.lr, betas=(0.9, 0.95))

    def lr_factor(step: int) -> float:
        if step < sizes.warmup_steps:
            return (step + 1) / sizes.warmup_steps
        progress_frac = (step - sizes.warmup_steps) / max(1, steps - sizes.warmup_steps)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress_frac))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)


def _train_steps(model, blocks: torch.Tensor, sizes: TrainSizes, steps: int, model_seed: int, name: str,
                 progress: bool, t0: float) -> float:
    """`steps` optimizer steps on batches of `blocks` [n_blocks, seq_len] drawn in seeded random epochs;
    -> the last step's loss (nats per token)."""
    optimizer, scheduler = _optimizer(model, sizes, steps)
    generator = torch.Generator().manual_seed(model_seed)
    order = torch.randperm(len(blocks), generator=generator)
    cursor = 0
    loss_value = float("nan")
    for step in range(steps):
        if cursor + sizes.batch > len(order):
            order = torch.randperm(len(blocks), generator=generator)
            cursor = 0
        batch = blocks[order[cursor: cursor + sizes.batch]]
        cursor += sizes.batch
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        loss_value = loss.detach().item()
        if progress and (step + 1) % 20 == 0:
            print(f"[micro] {name}: step {step + 1}/{steps} loss {loss_value:.3f} "
                  f"({time.perf_counter() - t0:.0f} s)", file=sys.stderr, flush=True)
    return loss_value


def _validation_bpb(model, tokenizer, corpus_dir: Path, seq_len: int) -> dict[str, float]:
    """{domain: held-out bits per byte} on the corpus's validation split."""
    validation_rows = read_jsonl(corpus_dir / "validation.jsonl")
    return {domain: heldout_bits_per_byte(model, tokenizer,
                                          [r["text"] for r in validation_rows if r["domain"] == domain], seq_len)
            for domain in DOMAINS}


def train_source(spec: SourceSpec, seed: int, sizes: TrainSizes, corpus_dir: Path, out_dir: Path,
                 progress: bool = True, mix_of: str | None = None) -> dict:
    """Train `spec`'s tokenizer and model on its training mix and save both to `out_dir` (an HF folder).

    Runs single-threaded with deterministic algorithms, so the same seed gives identical weights. mix_of: train
    on that source's mix (`training_mix`), so the tokenizer equals that source's (a wider teacher of it).
    Returns ``{"name", "train_tokens", "seconds", "final_loss", "validation_bpb": {domain: bits/byte}}``.
    """
    from transformers import AutoModelForCausalLM

    t0 = time.perf_counter()
    model_seed = zlib.crc32(f"{seed}:{spec.name}".encode())
    _seed_everything(model_seed)

    train_rows = read_jsonl(corpus_dir / "train.jsonl")
    mix = training_mix(spec, train_rows, seed, sizes.own_fraction, mix_of=mix_of)
    tokenizer = train_tokenizer(spec.tokenizer_kind, spec.vocab_size, mix, model_max_length=sizes.seq_len)
    blocks = _token_blocks(tokenizer, mix, sizes.seq_len)
    if len(blocks) < sizes.batch:
        raise ValueError(f"source {spec.name!r}: only {len(blocks)} blocks of {sizes.seq_len} tokens for batch "
                         f"{sizes.batch}; enlarge the corpus or shrink the batch")

    steps = sizes.steps_of(spec.name)
    model = AutoModelForCausalLM.from_config(model_config(spec, tokenizer, sizes.seq_len))
    model.train()
    loss_value = _train_steps(model, blocks, sizes, steps, model_seed, spec.name, progress, t0)
    model.eval()
    bpb = _validation_bpb(model, tokenizer, corpus_dir, sizes.seq_len)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    seconds = time.perf_counter() - t0
    if progress:
        print(f"[micro] {spec.name}: done in {seconds:.0f} s, validation bpb "
              + ", ".join(f"{d} {v:.3f}" for d, v in bpb.items()), file=sys.stderr, flush=True)
    return {"name": spec.name, "train_tokens": steps * sizes.batch * sizes.seq_len, "seconds": seconds,
            "final_loss": loss_value, "validation_bpb": bpb, "spec": asdict(spec)}
