"""A source model's top-k distributions moved onto the target's tokenization and vocabulary."""
from __future__ import annotations

import numpy as np

from .align import Alignment
from .fuse import merge_slots
from .tokens import TokenizedText
from .vocab import VocabMap

FALLBACK_ONEHOT = ("next_token", "current_token")
DUPLICATE_IDS = ("sum", "first")
POSITION0 = ("strict", "prepend_marker")
EMPTY_ROWS = ("zero", "target")


def align_distribution(target: TokenizedText, source: TokenizedText, source_ids: np.ndarray,
                       source_logprobs: np.ndarray, alignment: Alignment, vocab_map: VocabMap,
                       fallback_onehot: str = "next_token", duplicate_ids: str = "sum", position0: str = "strict",
                       empty_rows: str = "zero", target_ids: np.ndarray | None = None,
                       target_logprobs: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """The source's top-k at each target position, in target ids; a one-hot where the source cannot speak.

    source_ids int [n_s, k], source_logprobs float [n_s, k] (nats), from the source's own tokenization.
    A target position t uses the source's top-k when `alignment.one_to_one()[t] = s >= 0` and the source token
    maps to the target token (`vocab_map.source_to_target[source.ids[s]] == target.ids[t]`): probabilities
    exp(logprobs), ids mapped through the vocab map, unmapped ids dropped, several source ids landing on one
    target id summed (`duplicate_ids="sum"`) or only the first kept (`"first"`, the reference).
    `position0="prepend_marker"` (the reference): at t = 0, when the target token starts with its word-boundary
    marker and the source token does not start with its own, the source token is compared with the marker put
    in front (`vocab_map.prefixed_to_target`), since a sentencepiece target spells the text's first word "▁def"
    where a byte-level source spells it "def"; `"strict"` compares the tokens as they are.
    An accepted position whose top-k ids are all unmapped has nothing left: `empty_rows="zero"` leaves an
    all-zero row (the loss skips it), `"target"` (the reference) puts the target model's own top-k there
    (`target_ids` int [n_t, k_t], `target_logprobs` float [n_t, k_t] nats, on the target's tokenization).
    Any other position gets a one-hot on `target.ids[t+1]` (`fallback_onehot="next_token"`: position t predicts
    token t+1; the last position gets an all-zero row) or on `target.ids[t]` (`"current_token"`, the reference's bug).
    Returns ids int32 [n_t, k], probs float32 [n_t, k], rows sorted by probability; empty slots id 0 prob 0.
    """
    for name, value, choices in (("fallback_onehot", fallback_onehot, FALLBACK_ONEHOT),
                                 ("duplicate_ids", duplicate_ids, DUPLICATE_IDS),
                                 ("position0", position0, POSITION0), ("empty_rows", empty_rows, EMPTY_ROWS)):
        if value not in choices:
            raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    n_t, n_s = len(target.ids), len(source.ids)
    if alignment.n_target != n_t or alignment.n_source != n_s:
        raise ValueError(f"alignment is for {alignment.n_target} target x {alignment.n_source} source tokens, "
                         f"but the documents have {n_t} target and {n_s} source tokens")
    if source_ids.shape != source_logprobs.shape or source_ids.ndim != 2 or source_ids.shape[0] != n_s:
        raise ValueError(f"source_ids {source_ids.shape} and source_logprobs {source_logprobs.shape} must be "
                         f"[n_source={n_s}, k]: were they extracted from the same tokenization?")
    k = source_ids.shape[1]
    if empty_rows == "target":
        shapes = [None if a is None else a.shape for a in (target_ids, target_logprobs)]
        if shapes[0] is None or shapes[0] != shapes[1] or len(shapes[0]) != 2 or shapes[0][0] != n_t:
            raise ValueError(f"empty_rows='target' needs the target model's own top-k on the target tokenization: "
                             f"target_ids and target_logprobs [n_target={n_t}, k], got {shapes[0]} and {shapes[1]}")
    s2t = vocab_map.source_to_target
    if n_s and source.ids.max() >= len(s2t):
        raise ValueError(f"source document ids reach {source.ids.max()} but the vocab map covers {len(s2t)} source "
                         f"ids: the vocab map was built for another source tokenizer")
    if n_s and source_ids.max() >= len(s2t):
        # Models often pad their embedding matrix past the tokenizer (e.g. Qwen2.5: 151,936 rows, 151,665
        # tokens); a top-k id in that padding is no token at all: unmapped.
        s2t = np.concatenate([s2t, np.full(int(source_ids.max()) + 1 - len(s2t), -1, dtype=s2t.dtype)])

    ids = np.zeros((n_t, k), dtype=np.int32)
    probs = np.zeros((n_t, k), dtype=np.float32)
    src_pos, eligible = accepted_positions(target, source, alignment, vocab_map, position0)
    rows = np.flatnonzero(eligible)
    if len(rows):
        mapped = s2t[source_ids[src_pos[rows]]]                                   # [m, k], -1 = unmapped
        p = np.exp(source_logprobs[src_pos[rows]].astype(np.float64))
        p[mapped < 0] = 0.0
        if duplicate_ids == "first":
            # A slot is dropped when an earlier slot of the same row already mapped to the same target id.
            same = mapped[:, :, None] == mapped[:, None, :]
            earlier = np.tril(np.ones((k, k), dtype=bool), -1)
            p[(same & earlier).any(axis=2)] = 0.0
        ids[rows], probs[rows] = merge_slots(np.where(mapped < 0, 0, mapped), p, k)
        if empty_rows == "target":
            empty = rows[probs[rows, 0] <= 0]
            if len(empty):
                ids[empty], probs[empty] = merge_slots(target_ids[empty].astype(np.int64),
                                                       np.exp(target_logprobs[empty].astype(np.float64)), k)

    fallback = np.flatnonzero(~eligible)
    if fallback_onehot == "next_token":
        fallback = fallback[fallback < n_t - 1]
        ids[fallback, 0] = target.ids[fallback + 1]
    else:
        ids[fallback, 0] = target.ids[fallback]
    probs[fallback, 0] = 1.0
    return ids, probs


def accepted_positions(target: TokenizedText, source: TokenizedText, alignment: Alignment, vocab_map: VocabMap,
                       position0: str = "strict") -> tuple[np.ndarray, np.ndarray]:
    """Which target positions take the source's distribution (the rule `align_distribution` applies).

    Returns (src_pos int32 [n_t]: `alignment.one_to_one()`, the source position or -1; accepted bool [n_t]:
    one-to-one and the source token maps to the target token, with the reference's position-0 marker rule
    when position0="prepend_marker"; for an alignment with accept="any" (`fusion.boundary`) every one-to-one
    position).
    """
    s2t = vocab_map.source_to_target
    src_pos = alignment.one_to_one()
    accepted = src_pos >= 0
    if alignment.accept == "any":
        return src_pos, accepted
    accepted[accepted] = s2t[source.ids[src_pos[accepted]]] == target.ids[accepted]
    if (position0 == "prepend_marker" and len(target.ids) and src_pos[0] >= 0
            and _lacks_leading_marker(target, source, int(src_pos[0]))):
        if vocab_map.prefixed_to_target is None:
            raise ValueError("position0='prepend_marker' needs vocab_map.prefixed_to_target: build the vocab map "
                             "with fusion.vocab.build_vocab_map")
        accepted[0] = vocab_map.prefixed_to_target[source.ids[src_pos[0]]] == target.ids[0]
    return src_pos, accepted


def _lacks_leading_marker(target: TokenizedText, source: TokenizedText, s: int) -> bool:
    """The reference's position-0 condition: the target token starts with the target's word-boundary marker and
    the source token, spelled with the target's marker in place of its own, does not."""
    if not target.marker or not target.tokens[0].startswith(target.marker):
        return False
    spelled = source.tokens[s].replace(source.marker, target.marker) if source.marker else source.tokens[s]
    return not spelled.startswith(target.marker)
