"""Cross-tokenizer distillation: aligning two tokenisations of one text, and mapping one vocabulary onto
the other. Pure functions; the losses that read them are at the end of `distill.losses`.

How the trainer uses this (design note)
---------------------------------------

Both sides predict "what comes after byte b of the visible text". A position's *key* is that b, in
content coordinates (below); two positions, one per tokenizer, are aligned when their keys are equal.
So alignment is a join on keys, and each side's keys depend on its own tokenisation only.

Per row, the data path (`distill.data.tokenize_pair`) carries:

- ``input_ids``, ``labels``: the student's, exactly as the same-tokenizer path makes them;
- ``teacher_input_ids``: the same row tokenised (and, for chat, rendered) the teacher's way;
- ``alignment``: for each student position i (which predicts ``labels[i + 1]``), the teacher position
  whose prediction starts at the same byte, or -1. The collator pads it with -1.

The teacher runs on ``teacher_input_ids``; its top-k targets, taken over its tokenizer's ids only
(``logits[..., :len(teacher_tokenizer)]``: padded rows are not in the map), are gathered at
``alignment`` by `distill.losses.xtoken_distillation_loss`, which projects the student's
distribution into the teacher's vocabulary with a `VocabMap` built once per (student, teacher) pair
(`build_vocab_map`; for chat data with ``special_pairs={end_of_turn_id(student):
end_of_turn_id(teacher)}``), saved beside the run with `VocabMap.save` and refused by `VocabMap.load`
for another pair. Target positions with no teacher counterpart get the cross-entropy term only;
`unaligned_targets` counts them for the log, so that nothing is dropped silently. Identical
tokenizers give the identity map and alignment, and the loss is then the same-tokenizer top-k loss.

A top-k cache serves any student tokenizer when it is built in the teacher's token space
(`distill.cache_teacher`): each row one document, tokenised the teacher's way, with the teacher's
top-k at every teacher position. A run with another student tokenizer tokenises its rows with both
tokenizers (`distill.data.tokenize_pair`), finds each row's cached targets by its teacher tokens, and
aligns as with a live teacher; the teacher never runs again.

What the first-token map cannot carry: where the student's token is several teacher tokens (" 13" is
" ", "1", "3"), only the first is compared, and the teacher's positions inside the student token
("1" -> "3") align with no student position. Carrying those (GOLD's merged spans: the product of the
teacher's probabilities along the student token) needs the teacher's targets at consecutive positions
conditioned on the student's token, which a top-k cache does not hold; it is left out here.

Content coordinates
-------------------

The visible text is a list of content spans: the whole text (``text``), prompt + completion
(``prompt``/``completion``), or the assistant messages' contents (``messages``). Byte ``o`` of span
``n`` has coordinate ``base_n + o``, with ``base_0 = 1`` and ``base_{n+1} = base_n + len_n + 1``, so
that "the end of span n" and "the start of span n + 1" are different keys, and 0 means "before any
content". Everything else -- bos, eos, role markers, a chat template's scaffolding, the user's turns --
has no width: no position predicts "after" it, which is how a bos on one side only (Llama vs Qwen) or
two different chat templates cannot shift or collapse the alignment (TRL GOLD's bos bug).

Chat ``messages``: each side renders them with its *own* chat template (an instruct teacher is only
the teacher on the markup it was trained on; the student's markup would be foreign text to it), and
positions are aligned on the assistant messages' contents, located in each rendering. The end of a
turn aligns too: the student's position that predicts its end-of-turn token after the content, with
the teacher's that predicts the teacher's one (map them onto each other with ``special_pairs``, see
`end_of_turn_id`). A teacher without a chat template, or one that changes the contents it renders,
is a `UserError`.
"""

from __future__ import annotations

import bisect
import hashlib
import json
from pathlib import Path
from typing import NamedTuple

import torch

from distill.chat import assistant_spans
from distill.errors import UserError
from distill.losses import IGNORE_INDEX

NO_TOKEN = -1  # a vocabulary map entry with no teacher token: its mass goes to the tail bucket


def check_offsets(tokenizer, side: str) -> None:
    """Alignment needs character offsets, which only fast (Rust-backed) tokenizers give."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(
            f"the {side} tokenizer ({type(tokenizer).__name__}) is not a fast tokenizer, so it gives no "
            "character offsets and cross-tokenizer positions cannot be aligned; use a tokenizer with a "
            "tokenizer.json (AutoTokenizer.from_pretrained(..., use_fast=True))"
        )


# --- One side's encoding ---------------------------------------------------------------------------


class Piece(NamedTuple):
    """A token in content coordinates: [lo, hi), zero width if it carries no content. ``clean`` is
    False for a token that also covers template text beyond its span's edge: it predicts nothing at
    that edge and is predicted from nowhere."""

    lo: int
    hi: int
    clean: bool = True


class Encoding(NamedTuple):
    ids: list[int]
    target: list[bool]  # the token is a target (the student's labels: not -100)
    pieces: list[Piece]
    ends: frozenset[int]  # coordinates of the spans' ends


def _byte_index(text: str) -> list[int]:
    """b[c] = byte offset of character c in text.encode(), for c in 0..len(text)."""
    out = [0]
    for ch in text:
        out.append(out[-1] + len(ch.encode()))
    return out


def pieces_of(
    offsets: list[tuple[int, int]], text: str, spans: list[tuple[int, int]]
) -> tuple[list[Piece], frozenset[int]]:
    """Character offsets of tokens in ``text`` -> `Piece` s in content coordinates of ``spans``
    (character ranges of ``text``, in order, not overlapping). A token outside every span has zero
    width at the end of the last span before it. Offsets trimmed of a leading space (some byte-level
    tokenizers trim) are re-extended to the previous token's end, so that keys agree across sides."""
    to_byte = _byte_index(text)
    bases, base = [], 1
    for s, e in spans:
        bases.append(base)
        base += to_byte[e] - to_byte[s] + 1
    ends = frozenset(bases[n] + to_byte[e] - to_byte[s] for n, (s, e) in enumerate(spans))

    def coord(n: int, c: int) -> int:
        return bases[n] + to_byte[c] - to_byte[spans[n][0]]

    def span_of(x: int) -> int:  # the span a coordinate lies in (its end included)
        return bisect.bisect_right(bases, x) - 1

    pieces: list[Piece] = []
    prev_hi = None  # where the last token with content ended
    for a, e in offsets:
        inside = [n for n, (s, e_n) in enumerate(spans) if a < e_n and e > s] if e > a else []
        if not inside:  # template text or a special token: no width, after the last span before it
            before = [n for n, (_, e_n) in enumerate(spans) if e_n <= a]
            at = coord(before[-1], spans[before[-1]][1]) if before else 0
            pieces.append(Piece(at, at))
            continue
        first, last = inside[0], inside[-1]
        lo, hi = coord(first, max(a, spans[first][0])), coord(last, min(e, spans[last][1]))
        clean = first == last and a >= spans[first][0] and e <= spans[last][1]
        if prev_hi is not None and prev_hi < lo and span_of(prev_hi) == span_of(lo):
            lo = prev_hi  # trimmed offsets: the gap inside one span is the space this token holds
        pieces.append(Piece(lo, hi, clean))
        prev_hi = hi
    return pieces, ends


def prediction_keys(pieces: list[Piece], ends: frozenset[int]) -> list[int]:
    """For each position i, the content coordinate at which its prediction of token i + 1 starts, or
    -1 where that prediction does not start at a byte boundary of the visible text.

    With ``c`` = the furthest coordinate tokens 0..i reached and ``j = i + 1``:

    - j carries content starting at or after c: key ``lo_j`` (between pieces of one UTF-8 character,
      as a byte-level BPE splits an emoji, ``lo_j < c``: no key);
    - j carries none (an eos or end-of-turn marker) and token i is the last content of a span: key c,
      a span end. Only the first marker after the content gets it: later ones, and scaffolding, have
      no content before them that they follow.
    """
    keys = [-1] * len(pieces)
    reached = 0
    for i in range(len(pieces) - 1):
        p, q = pieces[i], pieces[i + 1]
        reached = max(reached, p.hi)
        if q.hi > q.lo:
            if q.clean and q.lo >= reached:
                keys[i] = q.lo
        elif p.hi > p.lo and p.clean and p.hi == reached and reached in ends:
            keys[i] = reached
    return keys


def align_keys(student_keys: list[int], teacher_keys: list[int]) -> list[int]:
    """For each student position, the teacher position with the same key, or -1. Keys are unique per
    side (a coordinate is predicted from one position), so this is a join."""
    where = {k: j for j, k in enumerate(teacher_keys) if k >= 0}
    return [where.get(k, -1) if k >= 0 else -1 for k in student_keys]


def unaligned_targets(alignment: list[int] | torch.Tensor, labels: list[int] | torch.Tensor) -> int:
    """Target positions (``labels[i + 1] != -100``) with no teacher position: they train on the labels
    only. A number to report, never to hide."""
    alignment, labels = torch.as_tensor(alignment), torch.as_tensor(labels)
    target = labels[..., 1:].ne(IGNORE_INDEX)
    return int((target & alignment[..., :-1].lt(0)).sum())


def aligned_teacher_positions(alignment: torch.Tensor, labels: torch.Tensor, width: int) -> torch.Tensor:
    """(batch, ``width``) bool: the teacher positions some student target position (``labels[i + 1] !=
    -100``) is aligned with: where the loss and agreement read the teacher's targets, and no others."""
    where = alignment[:, :-1]
    used = labels[:, 1:].ne(IGNORE_INDEX) & where.ge(0)
    out = torch.zeros(len(alignment), width, dtype=torch.bool, device=alignment.device)
    out[torch.arange(len(alignment), device=alignment.device)[:, None].expand_as(where)[used], where[used]] = True
    return out


def new_bytes(pieces: list[Piece]) -> list[int]:
    """For each token, the bytes of visible text it reaches that no token before it did:
    ``max(0, hi_i - max(lo_i, c))`` with ``c`` the furthest coordinate tokens 0..i-1 reached. Zero for
    bos, eos, end-of-turn markers and template text; a UTF-8 character split over several byte-level
    tokens counts once, on the first. Summed over a side's tokens: the bytes of its visible text (a
    token running over a span's edge into the next also counts the one-coordinate gap between them).
    What bits per byte divides by (`distill.evaluate`), the same for every tokenizer."""
    out, reached = [], 0
    for p in pieces:
        out.append(max(0, p.hi - max(p.lo, reached)))
        reached = max(reached, p.hi)
    return out


def _affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids ``tokenizer(text)`` puts before and after the text's own (bos, eos, ...)."""
    probe = "a"
    bare = tokenizer(probe, add_special_tokens=False)["input_ids"]
    full = tokenizer(probe)["input_ids"]
    at = next((i for i in range(len(full)) if full[i : i + len(bare)] == bare), None)
    if at is None:
        raise UserError(
            f"{type(tokenizer).__name__}: tokenizing with special tokens changes the text's own ids "
            f"({full} vs {bare}), so its offsets cannot be placed; cross-tokenizer alignment cannot use it"
        )
    return full[:at], full[at + len(bare) :]


def _tokenize(tokenizer, text: str, shift: int = 0) -> tuple[list[int], list[tuple[int, int]]]:
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    return enc["input_ids"], [(a + shift, e + shift) for a, e in enc["offset_mapping"]]


def _locate_assistant_contents(tokenizer, messages: list[dict], side: str):
    """(rendering, each assistant message's content span in it, each assistant turn's span: content,
    end marker and template text up to the next turn, as `distill.data` marks targets). Each turn is found
    between the rendering of the turns before it (with the generation prompt) and of the turns up to
    it, so a word of the content that also occurs in the template cannot be mistaken for it."""
    if not tokenizer.chat_template:
        raise UserError(
            f"the data is chat `messages` but the {side} tokenizer has no chat template; cross-tokenizer "
            "distillation renders each side with its own template (give the teacher its instruct tokenizer)"
        )
    text, turns = assistant_spans(messages, tokenizer)
    contents = [str(m["content"]) for m in messages if m["role"] == "assistant"]
    spans = []
    for content, (start, end) in zip(contents, turns):
        at = text.find(content, start, end)
        if at < 0:
            raise UserError(
                f"the {side}'s chat template changes an assistant message's content when it renders it "
                f"(content {content[:40]!r} not found in its rendering), so the two tokenisations cannot be "
                "aligned on it; fix the template or convert the data to prompt/completion form"
            )
        spans.append((at, at + len(content)))
    return text, spans, turns


def encode(tokenizer, row: dict, side: str = "student") -> Encoding:
    """One row (``text``, ``prompt`` + ``completion`` or ``messages``) as ``tokenizer`` sees it, with
    the targets the same-tokenizer data path marks (`distill.data`) and content coordinates.

    - ``text``: ``tokenizer(text)`` + eos, all targets (one document; the data path's packing is per
      tokenizer, see the module note).
    - ``prompt``/``completion``: ``tokenizer(prompt)`` + the completion's bare ids + eos, targets on
      the completion and eos; the two are tokenised apart on both sides, so their seam is a boundary
      for both.
    - ``messages``: the tokenizer's own chat template, targets on each assistant turn from its start
      to the next turn (content, end marker, template text after it), as `distill.data` marks them.
    """
    check_offsets(tokenizer, side)
    eos = [] if tokenizer.eos_token_id is None else [tokenizer.eos_token_id]
    if "messages" in row:
        text, spans, turns = _locate_assistant_contents(tokenizer, row["messages"], side)
        ids, offsets = _tokenize(tokenizer, text)
        target = [any(s <= a < e for s, e in turns) for a, _ in offsets]
    else:
        prefix, suffix = _affixes(tokenizer)
        if "completion" in row:
            prompt, completion = str(row["prompt"]), str(row["completion"])
            p_ids, p_off = _tokenize(tokenizer, prompt)
            c_ids, c_off = _tokenize(tokenizer, completion, shift=len(prompt))
            text = prompt + completion
            ids = prefix + p_ids + suffix + c_ids
            offsets = [(0, 0)] * len(prefix) + p_off + [(len(prompt),) * 2] * len(suffix) + c_off
            n_prompt = len(prefix) + len(p_ids) + len(suffix)
        else:
            text = str(row["text"])
            body_ids, offsets = _tokenize(tokenizer, text)
            ids = prefix + body_ids + suffix
            offsets = [(0, 0)] * len(prefix) + offsets + [(len(text),) * 2] * len(suffix)
            n_prompt = 0
        if eos and ids[-1:] != eos:  # as the data path's _with_eos
            ids, offsets = ids + eos, offsets + [(len(text), len(text))]
        target = [i >= n_prompt for i in range(len(ids))]
        spans = [(0, len(text))]
    pieces, ends = pieces_of(offsets, text, spans)
    return Encoding(ids, target, pieces, ends)


def align(student: Encoding, teacher: Encoding) -> list[int]:
    """Student position -> aligned teacher position, or -1 (see `prediction_keys`).

    The same token sequence on both sides (identical tokenizers) is aligned position by position,
    markup included, so that the cross-tokenizer path is then the same-tokenizer one exactly."""
    if student.ids == teacher.ids:
        return list(range(len(student.ids) - 1)) + [-1] if student.ids else []
    return align_keys(prediction_keys(student.pieces, student.ends), prediction_keys(teacher.pieces, teacher.ends))


def end_of_turn_id(tokenizer) -> int | None:
    """The token a chat template writes right after an assistant message's content (``</s>``,
    ``<|im_end|>``, ``<|eot_id|>``): what the model predicts at the end of its turn. None without a
    template or when the template writes content-bearing text there."""
    if not tokenizer.chat_template:
        return None
    sentinel = "Zq"
    messages = [{"role": "user", "content": "x"}, {"role": "assistant", "content": sentinel}]
    text, spans, _ = _locate_assistant_contents(tokenizer, messages, "")
    ids, offsets = _tokenize(tokenizer, text)
    after = [t for t, (a, _) in zip(ids, offsets) if a >= spans[0][1]]
    if not after or after[0] not in tokenizer.all_special_ids:
        return None
    return after[0]


# --- The vocabulary map ----------------------------------------------------------------------------


def tokenizer_hash(tokenizer) -> str:
    """sha256 of the tokenizer's tokenizer.json (vocabulary, merges, special tokens, pre-tokenizer)."""
    return hashlib.sha256(tokenizer.backend_tokenizer.to_str().encode()).hexdigest()


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table, which byte-level BPE vocabularies are written in."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


def _decoder_types(node) -> set[str]:
    if isinstance(node, dict):
        return {node.get("type", "")} | set().union(*(_decoder_types(v) for v in node.values()))
    if isinstance(node, list):
        return set().union(*(_decoder_types(v) for v in node)) if node else set()
    return set()


def token_bytes(tokenizer) -> list[bytes | None]:
    """The bytes each id stands for in text; None for special tokens. Byte-level vocabularies are
    read through GPT-2's byte table (a token may be part of a UTF-8 character); SentencePiece ones
    with ``▁`` as a space and ``<0xNN>`` byte tokens; others through ``decode``."""
    special = set(tokenizer.all_special_ids) | {
        i for i, t in tokenizer.added_tokens_decoder.items() if getattr(t, "special", False)
    }
    types = _decoder_types(json.loads(tokenizer.backend_tokenizer.to_str()).get("decoder"))
    n = len(tokenizer)
    tokens = tokenizer.convert_ids_to_tokens(list(range(n)))
    byte_of = {c: b for b, c in _bytes_to_unicode().items()}
    out: list[bytes | None] = []
    for i, tok in enumerate(tokens):
        if i in special or tok is None:
            out.append(None)
        elif "ByteLevel" in types and all(c in byte_of for c in tok):
            out.append(bytes(byte_of[c] for c in tok))
        elif "ByteFallback" in types and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            out.append(bytes([int(tok[3:5], 16)]))
        elif "Metaspace" in types or "Replace" in types:
            out.append(tok.replace("\u2581", " ").encode())
        else:
            text = tokenizer.decode([i])
            out.append(None if "\ufffd" in text else text.encode())
    return out


class VocabMap(NamedTuple):
    """Student vocabulary -> teacher vocabulary, sparse: row s holds up to k teacher ids and weights.

    Weighting: an exact match (the same bytes are one teacher token) is pinned to weight 1. Otherwise
    the student token's text is re-tokenised by the teacher and the whole mass goes to the *first*
    teacher token, since at an aligned boundary that is the teacher's next token; the following ones
    (kept in ``ids`` with weight 0, up to k) would be the teacher's predictions at later positions,
    not this one. Text that is not valid UTF-8 on its own (a piece of a character) goes to the
    longest teacher token its bytes start with. Special tokens map only through ``special_pairs``;
    the rest, and text the teacher cannot start, map to `NO_TOKEN` (their mass is the tail's).
    """

    ids: torch.Tensor  # (V_student, k) long; NO_TOKEN where none
    weights: torch.Tensor  # (V_student, k) float32; each row sums to 1
    exact: torch.Tensor  # (V_student,) bool: the student token is exactly one teacher token, ids[:, 0]
    teacher_vocab_size: int
    student_hash: str
    teacher_hash: str
    special_pairs: dict[int, int]  # the student special -> teacher special pins it was built with

    def save(self, path: str | Path) -> None:
        """Write to a safetensors file, never over another map."""
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists():
            old = VocabMap.read(path)
            if (
                old.student_hash == self.student_hash
                and old.teacher_hash == self.teacher_hash
                and old.ids.equal(self.ids)
            ):
                return
            raise UserError(f"{path} already holds another vocabulary map; remove it or save elsewhere")
        meta = {
            "teacher_vocab_size": str(self.teacher_vocab_size),
            "student_hash": self.student_hash,
            "teacher_hash": self.teacher_hash,
            "special_pairs": json.dumps(sorted(self.special_pairs.items())),
        }
        tensors = {"ids": self.ids.contiguous(), "weights": self.weights.contiguous(), "exact": self.exact}
        save_file(tensors, str(path), metadata=meta)

    @staticmethod
    def read(path: str | Path) -> VocabMap:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata()
            t = {name: f.get_tensor(name) for name in ("ids", "weights", "exact")}
        return VocabMap(
            t["ids"],
            t["weights"],
            t["exact"],
            int(meta["teacher_vocab_size"]),
            meta["student_hash"],
            meta["teacher_hash"],
            {int(a): int(b) for a, b in json.loads(meta["special_pairs"])},
        )

    @staticmethod
    def load(
        path: str | Path, student_tokenizer, teacher_tokenizer, special_pairs: dict[int, int] | None = None
    ) -> VocabMap:
        """Read a saved map, refusing one built for another (student, teacher) pair or with other
        ``special_pairs`` (as `build_vocab_map` takes them: None is eos -> eos)."""
        vmap = VocabMap.read(path)
        for side, tok, want in (
            ("student", student_tokenizer, vmap.student_hash),
            ("teacher", teacher_tokenizer, vmap.teacher_hash),
        ):
            if tokenizer_hash(tok) != want:
                raise UserError(
                    f"{path} is a vocabulary map for another {side} tokenizer (hash {want[:12]}, this one "
                    f"{tokenizer_hash(tok)[:12]}); delete it to rebuild the map for this pair"
                )
        want = (
            {}
            if vmap.student_hash == vmap.teacher_hash
            else _pairs(student_tokenizer, teacher_tokenizer, special_pairs)
        )
        if vmap.special_pairs != want:
            raise UserError(
                f"{path} maps special tokens {vmap.special_pairs} (student id -> teacher id), this run wants "
                f"{want}; delete it to rebuild the map"
            )
        return vmap

    def reachable(self) -> torch.Tensor:
        """(V_teacher,) bool: the teacher ids some student token puts mass on."""
        out = torch.zeros(self.teacher_vocab_size, dtype=torch.bool)
        hit = self.ids[self.weights > 0]
        out[hit[hit >= 0]] = True
        return out

    def exact_student_of(self) -> torch.Tensor:
        """(V_teacher,) long: the student id that is exactly teacher id t, or NO_TOKEN."""
        out = torch.full((self.teacher_vocab_size,), NO_TOKEN, dtype=torch.long)
        s = self.exact.nonzero().view(-1)
        out[self.ids[s, 0]] = s
        return out


def _pairs(student_tokenizer, teacher_tokenizer, special_pairs: dict[int, int] | None) -> dict[int, int]:
    if special_pairs is not None:
        return dict(special_pairs)
    s_eos, t_eos = student_tokenizer.eos_token_id, teacher_tokenizer.eos_token_id
    return {} if s_eos is None or t_eos is None else {s_eos: t_eos}


def pinned_pairs(fmt: str, student_tokenizer, teacher_tokenizer) -> dict[int, int] | None:
    """The ``special_pairs`` of `build_vocab_map` for data of format ``fmt``: chat (``messages``) pins
    the student's end-of-turn token to the teacher's (none where a side has none); other data None,
    the default eos -> eos."""
    if fmt != "messages":
        return None
    ends = end_of_turn_id(student_tokenizer), end_of_turn_id(teacher_tokenizer)
    return {ends[0]: ends[1]} if None not in ends else {}


def build_vocab_map(
    student_tokenizer, teacher_tokenizer, k: int = 4, special_pairs: dict[int, int] | None = None
) -> VocabMap:
    """The `VocabMap` of a (student, teacher) tokenizer pair; identical tokenizers give the identity.

    ``special_pairs``: student special id -> teacher special id, each pinned like an exact match.
    Default: eos -> eos. For chat data, map the student's end-of-turn token to the teacher's
    (`end_of_turn_id` of each), since that is what an aligned end of turn compares.
    """
    if not 1 <= k <= 4:
        raise ValueError(f"k must be 1..4, got {k}")
    s_hash, t_hash = tokenizer_hash(student_tokenizer), tokenizer_hash(teacher_tokenizer)
    v_s, v_t = len(student_tokenizer), len(teacher_tokenizer)
    if s_hash == t_hash:
        ids = torch.full((v_s, k), NO_TOKEN, dtype=torch.long)
        ids[:, 0] = torch.arange(v_s)
        weights = torch.zeros(v_s, k)
        weights[:, 0] = 1.0
        return VocabMap(ids, weights, torch.ones(v_s, dtype=torch.bool), v_t, s_hash, t_hash, {})
    special_pairs = _pairs(student_tokenizer, teacher_tokenizer, special_pairs)
    s_bytes, t_bytes = token_bytes(student_tokenizer), token_bytes(teacher_tokenizer)
    teacher_of = {b: t for t, b in enumerate(t_bytes) if b is not None}
    longest = max(map(len, teacher_of), default=0)
    ids = torch.full((v_s, k), NO_TOKEN, dtype=torch.long)
    weights = torch.zeros(v_s, k)
    weights[:, 0] = 1.0
    exact = torch.zeros(v_s, dtype=torch.bool)
    for s, b in enumerate(s_bytes):
        if s in special_pairs:
            ids[s, 0], exact[s] = special_pairs[s], True
        elif b is None or not b:
            continue  # NO_TOKEN: mass to the tail
        elif b in teacher_of:
            ids[s, 0], exact[s] = teacher_of[b], True
        else:
            try:
                row = teacher_tokenizer(b.decode(), add_special_tokens=False)["input_ids"][:k]
            except UnicodeDecodeError:  # a piece of a character: the longest teacher token it starts with
                row = [
                    next(
                        (teacher_of[b[:n]] for n in range(min(len(b), longest), 0, -1) if b[:n] in teacher_of), NO_TOKEN
                    )
                ]
            ids[s, : len(row)] = torch.tensor(row)
    return VocabMap(ids, weights, exact, v_t, s_hash, t_hash, special_pairs)


def mapped_agreement(student_top1, teacher_top1, labels, alignment, vocab_map: VocabMap):
    """(matches, aligned target positions) across tokenizers: at each student target position with an
    aligned teacher position, the student's top-1 sent through the vocabulary map (the teacher token its
    mass goes to, ``ids[:, 0]``) is the teacher's top-1 there. ``*_top1``: (batch, seq) argmax ids on
    each side's own positions; ``alignment``: (batch, student seq), -1 where none. Unaligned positions
    are in neither count (they are reported as the unaligned share). Training's held-out agreement
    (`distill.teacher.CrossTopK.agreement`) is this count."""
    where = alignment[:, :-1]
    mask = labels[:, 1:].ne(IGNORE_INDEX) & where.ge(0)
    mapped = vocab_map.ids[:, 0].to(student_top1.device)[student_top1[:, :-1]]
    theirs = teacher_top1.gather(1, where.clamp(min=0))
    return (mapped.eq(theirs) & mask).sum(), mask.sum()
