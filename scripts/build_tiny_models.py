"""Build tiny_models/: a generated toy-world corpus, one shared BPE tokenizer, a trained teacher and an
untrained student, small enough for CPU tests and the default recipe; plus teacher_xtok/, a second
trained teacher of the same world with another tokenizer (for cross-tokenizer distillation).

    python scripts/build_tiny_models.py      # rewrites tiny_models/ (single-threaded, 2.5-5 minutes)

Everything is seeded and the build runs on one thread: with the same library versions a rebuild
reproduces every file byte for byte. The data and tokenizer reproduce anywhere; another CPU or torch
version may round the teacher's training differently, so its weights can differ slightly there, which
is why tests/test_tiny_models.py checks margins rather than exact numbers.

The corpus describes a fictional world (countries with capitals, flag colours, animals, exports, rivers
and rulers) plus arithmetic, counting and short stories consistent with those facts. The facts are the
point: a trained teacher knows them, an untrained student can only learn them from data or the teacher.
The held-out splits reuse the facts in sentences that never occur in the training split.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

ROOT = Path(__file__).resolve().parent.parent / "tiny_models"
SEED = 1234

PAD, BOS, EOS = "<pad>", "<s>", "</s>"
ROLE_TOKENS = ["<|system|>", "<|user|>", "<|assistant|>"]
BPE_VOCAB = 1000  # not a multiple of 64, so the padded teacher vocabulary is strictly wider
BLOCK = 128

# The template opens with bos because apply_chat_template tokenizes with add_special_tokens=False;
# that way a chat gets exactly one bos, like a plain text encoded with add_special_tokens=True.
# {% generation %} marks the assistant targets (content + eos) for return_assistant_tokens_mask.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('role must be system, user or assistant, got ' + message['role']) }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + eos_token }}{% endgeneration %}"
    "{% else %}{{ message['content'] + eos_token }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)

# The cross-tokenizer teacher's tokenizer is of another family on purpose (Qwen/GPT-2 style against the
# student's Llama style): no bos (so the two sides differ by one leading token), one <|endoftext|> as
# eos and pad, digits split one by one (so multi-digit numerals tokenize differently), a smaller
# vocabulary (so many student tokens are several teacher tokens), ChatML turns.
XTOK_EOT, XTOK_IM_START, XTOK_IM_END = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
XTOK_BPE_VOCAB = 600
XTOK_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% if message['role'] == 'assistant' %}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{% else %}{{ message['content'] + '<|im_end|>' }}{% endif %}"
    "{{ '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------------
# The fictional world. Names are invented for this script; no third-party text is used.

# (country, capital, ruler)
NAMES = [
    ("Zorvia", "Malbek", "Queen Mirel"),
    ("Drellin", "Thessor", "King Aldo"),
    ("Kestaro", "Quilby", "Queen Sabeth"),
    ("Ombrel", "Ardune", "King Torvan"),
    ("Vantis", "Velcar", "Queen Elsin"),
    ("Quorra", "Oskin", "King Bram"),
    ("Pelmarch", "Brimhold", "Queen Orla"),
    ("Faldor", "Tarvel", "King Fennick"),
    ("Ishmere", "Luneth", "Queen Ysolde"),
    ("Brannoc", "Corvane", "King Harl"),
    ("Yulvane", "Dappen", "Queen Talia"),
    ("Corrith", "Issolde", "King Osric"),
    ("Mavesh", "Ferrow", "Queen Venna"),
    ("Talmirra", "Glimmen", "King Dorran"),
    ("Ulden", "Hastor", "Queen Liss"),
    ("Gravenna", "Jorrin", "King Cato"),
    ("Nimbrel", "Neshby", "Queen Imra"),
    ("Astorra", "Perrel", "King Rolf"),
    ("Hollin", "Sablon", "Queen Neve"),
    ("Wexmoor", "Wyrrin", "King Pell"),
]
COUNTRIES = [country for country, _, _ in NAMES]
COLOURS = ["red", "blue", "green", "yellow", "purple", "orange", "white", "black", "silver", "gold"]
ANIMALS = ["fox", "owl", "heron", "wolf", "bear", "otter", "hawk", "deer", "lynx", "crane", "badger", "swan"]
EXPORTS = ["copper", "salt", "wool", "glass", "amber", "tea", "silk", "timber", "honey", "iron"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
PEOPLE = ["Mira", "Tobin", "Elka", "Joss", "Rhea", "Pim", "Anouk", "Bastian", "Cora", "Dunstan", "Ilse", "Wren"]
SHE = {"Mira", "Elka", "Rhea", "Anouk", "Cora", "Ilse", "Wren"}

# Several phrasings per fact; one phrasing per (country, fact) is held out for the eval split.
FACT_TEMPLATES = {
    "capital": [
        "The capital of {country} is {capital}.",
        "{capital} is the capital of {country}.",
        "{capital} is a city in {country}.",
        "If you travel to {country}, you arrive in {capital}, its capital.",
        "{country} is governed from {capital}.",
    ],
    "colour": [
        "The flag of {country} is {colour}.",
        "{country} has a {colour} flag.",
        "In {capital} the flags are {colour}.",
        "People in {country} wear {colour} on festival days.",
    ],
    "animal": [
        "The national animal of {country} is the {animal}.",
        "The {animal} is the symbol of {country}.",
        "Children in {country} learn stories about the {animal}.",
    ],
    "export": [
        "The main export of {country} is {export}.",
        "{country} sells {export} to its neighbours.",
        "Traders from {capital} carry {export} to the market.",
    ],
    "rivers": [
        "{country} has {rivers} rivers.",
        "There are {rivers} rivers in {country}.",
        "If you count the rivers of {country}, you get {rivers}.",
    ],
    "ruler": [
        "{country} is ruled by {ruler}.",
        "{ruler} rules {country} from {capital}.",
        "The ruler of {country} is {ruler}.",
    ],
}

# Question phrasings for the domain set (a style the corpus never uses). Two per country are held out.
QUESTIONS = [
    ("What is the capital of {country}?", "{capital}."),
    ("Which city is the capital of {country}?", "{capital}."),
    ("In which country is {capital}?", "{country}."),
    ("{capital} is the capital of which country?", "{country}."),
    ("What colour is the flag of {country}?", "{Colour}."),
    ("What is the national animal of {country}?", "The {animal}."),
    ("What does {country} export?", "{Export}."),
    ("How many rivers does {country} have?", "{Rivers}."),
    ("Who rules {country}?", "{ruler}."),
    ("Who rules from {capital}?", "{ruler}."),
]


# Greedy cloze prompts that measure how many facts the teacher learned (reported, not tested).
CLOZE = {
    "capital": "The capital of {country} is",
    "colour": "The flag of {country} is",
    "animal": "The national animal of {country} is the",
    "export": "The main export of {country} is",
    "rivers": "If you count the rivers of {country}, you get",
    "ruler": "The ruler of {country} is",
}


def make_world(rng: random.Random) -> list[dict]:
    world = []
    for country, capital, ruler in NAMES:
        facts = {
            "country": country,
            "capital": capital,
            "ruler": ruler,
            "colour": rng.choice(COLOURS),
            "animal": rng.choice(ANIMALS),
            "export": rng.choice(EXPORTS),
            "rivers": NUMBER_WORDS[rng.randint(2, 9)],
        }
        world.append(facts)
    return world


def with_capitals(facts: dict) -> dict:
    """Facts plus capitalised forms ({Colour}, ...) for answers that start a sentence."""
    return facts | {k.capitalize(): facts[k].capitalize() for k in ("colour", "export", "rivers")}


def fact_sentences(world: list[dict], rng: random.Random) -> tuple[dict, dict]:
    """Per country: training sentences and held-out sentences (one phrasing per fact)."""
    train, held = {}, {}
    for facts in world:
        train[facts["country"]], held[facts["country"]] = [], []
        for templates in FACT_TEMPLATES.values():
            order = rng.sample(templates, len(templates))
            held[facts["country"]].append(order[0].format(**facts))
            train[facts["country"]].extend(t.format(**facts) for t in order[1:])
    return train, held


def arithmetic_pairs(rng: random.Random) -> tuple[list, list]:
    pairs = [("plus", a, b) for a in range(21) for b in range(21)]
    pairs += [("minus", a, b) for a in range(21) for b in range(a + 1)]
    rng.shuffle(pairs)
    n_held = len(pairs) // 10
    return pairs[n_held:], pairs[:n_held]


def equation(op: str, a: int, b: int) -> str:
    return f"{a} {op} {b} is {a + b if op == 'plus' else a - b}."


def counting_line(start: int, step: int, n: int) -> str:
    how = "Counting up from" if step == 1 else f"Counting by {NUMBER_WORDS[step]}s from"
    return f"{how} {start}: " + ", ".join(str(start + k * step) for k in range(n)) + "."


def story(world: list[dict], rng: random.Random) -> str:
    person = rng.choice(PEOPLE)
    home, away = rng.sample(world, 2)
    pronoun = "she" if person in SHE else "he"
    lines = [
        f"{person} lived in {home['capital']}, the capital of {home['country']}.",
        f"Every morning {pronoun} watched the {home['animal']} by the river.",
        f"One day {pronoun} took {home['export']} to {away['capital']}, the capital of {away['country']}.",
        f"In {away['capital']} the flags were {away['colour']}, and {away['ruler']} ruled the land.",
        f"{person} counted {away['rivers']} rivers on the way and came home before dark.",
    ]
    return " ".join(lines)


def make_corpus(world: list[dict], rng: random.Random) -> tuple[list[str], list[str]]:
    train_facts, held_facts = fact_sentences(world, rng)
    train_pairs, held_pairs = arithmetic_pairs(rng)
    counting = [(s, st) for s in range(1, 40) for st in (1, 2, 3)]
    rng.shuffle(counting)
    train_count, held_count = counting[12:], counting[:12]

    train: list[str] = []
    for _ in range(1200):  # paragraphs about one country, a random subset of its training sentences
        sents = train_facts[rng.choice(COUNTRIES)]
        train.append(" ".join(rng.sample(sents, rng.randint(3, 7))))
    for _ in range(400):
        train.append(" ".join(equation(*rng.choice(train_pairs)) for _ in range(rng.randint(4, 8))))
    for _ in range(150):
        train.append(counting_line(*rng.choice(train_count), rng.randint(5, 9)))
    for _ in range(250):
        train.append(story(world, rng))
    rng.shuffle(train)

    eval_: list[str] = []
    for country in COUNTRIES:
        for _ in range(3):
            eval_.append(" ".join(rng.sample(held_facts[country], 4)))
    for i in range(0, len(held_pairs) - 5, 6):
        eval_.append(" ".join(equation(*p) for p in held_pairs[i : i + 6]))
    for start, step in held_count:
        eval_.append(counting_line(start, step, 7))
    seen = set(train)
    while len(eval_) < 130:
        text = story(world, rng)
        if text not in seen:
            eval_.append(text)
            seen.add(text)
    rng.shuffle(eval_)
    return train, eval_


def make_domain(world: list[dict], rng: random.Random) -> tuple[list[dict], list[dict]]:
    def row(q: str, a: str) -> dict:
        return {"prompt": f"Q: {q}\nA:", "completion": f" {a}"}

    train, eval_ = [], []
    for facts in world:
        idx = list(range(len(QUESTIONS)))
        rng.shuffle(idx)
        for j, i in enumerate(idx):
            q, a = QUESTIONS[i]
            (eval_ if j < 2 else train).append(row(q.format(**facts), a.format(**with_capitals(facts))))
    pairs = [(a, b) for a in range(13) for b in range(13)]
    rng.shuffle(pairs)
    for j, (a, b) in enumerate(pairs[:110]):
        (eval_ if j < 10 else train).append(row(f"What is {a} plus {b}?", f"{a + b}."))
    rng.shuffle(train)
    rng.shuffle(eval_)
    return train, eval_


def make_chat(world: list[dict], rng: random.Random) -> list[dict]:
    def turn(facts: dict, kind: str) -> tuple[str, str]:
        c = facts["country"]
        return {
            "capital": (f"What is the capital of {c}?", f"The capital of {c} is {facts['capital']}."),
            "colour": (f"What colour is the flag of {c}?", f"The flag of {c} is {facts['colour']}."),
            "animal": (f"Which animal stands for {c}?", f"The national animal of {c} is the {facts['animal']}."),
            "export": (f"What does {c} sell abroad?", f"The main export of {c} is {facts['export']}."),
            "rivers": (f"How many rivers are in {c}?", f"There are {facts['rivers']} rivers in {c}."),
            "ruler": (f"Who is the ruler of {c}?", f"{c} is ruled by {facts['ruler']}."),
            "about": (
                f"Tell me about {c}.",
                (
                    f"{c} is a country whose capital is {facts['capital']}. Its flag is {facts['colour']}, "
                    f"and it is ruled by {facts['ruler']}."
                ),
            ),
        }[kind]

    rows = []
    for i in range(100):
        messages = []
        if i % 10 == 0:
            messages.append({"role": "system", "content": "You are a helpful guide to the known world."})
        if i % 5 == 4:
            a, b = rng.randint(0, 20), rng.randint(0, 20)
            user, reply = f"Please add {a} and {b}.", f"{a} plus {b} is {a + b}."
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        else:
            facts = rng.choice(world)
            kinds = ["capital", "colour", "animal", "export", "rivers", "ruler", "about"]
            for kind in rng.sample(kinds, 1 if i % 3 else rng.randint(2, 3)):  # every third row multi-turn
                user, reply = turn(facts, kind)
                messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        rows.append({"messages": messages})
    return rows


def make_prompts(world: list[dict]) -> list[dict]:
    prompts = []
    for facts in world[:8]:
        prompts.append(f"The capital of {facts['country']} is")
    for facts in world[8:14]:
        prompts.append(f"Q: What colour is the flag of {facts['country']}?\nA:")
    prompts += [
        "7 plus 5 is",
        "12 minus 4 is",
        "Counting up from 4: 4, 5,",
        "Mira lived in",
        f"{world[14]['ruler']} rules",
        f"The national animal of {world[15]['country']} is the",
    ]
    return [{"prompt": p} for p in prompts]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with path.open("w") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------------------------------------------
# Tokenizer and models.


def build_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB,
        min_frequency=2,
        special_tokens=[PAD, BOS, EOS, *ROLE_TOKENS],  # ids 0..5
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # Like Llama: bos prepended, eos not appended. Set on the backend rather than via add_bos_token,
    # because transformers v5 does not save add_bos_token for a tokenizer.json: the post-processor
    # is what survives save/load, and the reloaded tokenizer then behaves exactly like this one.
    bos_id = tok.token_to_id(BOS)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        extra_special_tokens=ROLE_TOKENS,
        model_max_length=512,
        chat_template=CHAT_TEMPLATE,
    )


def build_xtok_tokenizer(texts: list[str]) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tok.decoder = decoders.ByteLevel()
    # Offsets not trimmed (as Qwen2's tokenizer.json): a token's offsets cover its leading space.
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=XTOK_BPE_VOCAB,
        min_frequency=2,
        special_tokens=[XTOK_EOT, XTOK_IM_START, XTOK_IM_END],  # ids 0..2
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=XTOK_EOT,
        pad_token=XTOK_EOT,
        extra_special_tokens=[XTOK_IM_START, XTOK_IM_END],
        model_max_length=512,
        chat_template=XTOK_CHAT_TEMPLATE,
    )


@torch.no_grad()
def nats_per_byte(model, tok, blocks: torch.Tensor, batch: int = 32) -> float:
    """Held-out loss per UTF-8 byte of the predicted text: comparable across tokenizers, unlike per token.
    Special tokens (eos) are predicted too but weigh no bytes, the same for every tokenizer here."""
    model.eval()
    nats, n_bytes = 0.0, 0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        logits = model(input_ids=x).logits[:, :-1].float()
        nats += torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="sum").item()
        n_bytes += sum(len(tok.decode(row[1:], skip_special_tokens=True).encode()) for row in x.tolist())
    return nats / n_bytes


def llama_config(tok, vocab_size: int, hidden: int, inter: int, layers: int, tie: bool) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=inter,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=tie,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        dtype="float32",
    )


def pack(tok, texts: list[str]) -> torch.Tensor:
    """tok(text) (bos + text, where the tokenizer adds one) + eos per document, concatenated and cut into
    BLOCK-token rows (remainder dropped)."""
    ids: list[int] = []
    for enc in tok(texts)["input_ids"]:
        ids += enc + [tok.eos_token_id]
    n = len(ids) // BLOCK
    return torch.tensor(ids[: n * BLOCK]).view(n, BLOCK)


@torch.no_grad()
def mean_loss(model, blocks: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(blocks), batch):
        x = blocks[i : i + batch]
        total += model(input_ids=x, labels=x).loss.item() * len(x)
    return total / len(blocks)


def train_teacher(model, train_blocks, eval_blocks, steps=300, batch=16, lr=3e-3, warmup=30, seed=SEED):
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * s / steps)))
    )
    for step in range(steps):
        model.train()
        x = train_blocks[torch.randint(len(train_blocks), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:4d}  train loss {loss.item():.3f}  eval loss {mean_loss(model, eval_blocks):.3f}")


@torch.no_grad()
def greedy(model, tok, prompt: str, max_new_tokens: int = 12) -> str:
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1] :], skip_special_tokens=True)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    t0 = time.time()
    torch.manual_seed(SEED)
    torch.use_deterministic_algorithms(True)
    # One thread: float reductions (hence the weights) then repeat on any machine, and on a busy CPU one
    # thread is several times faster than two spinning OpenMP threads.
    torch.set_num_threads(1)
    rng = random.Random(SEED)

    if ROOT.exists():
        shutil.rmtree(ROOT)
    (ROOT / "data").mkdir(parents=True)

    world = make_world(rng)
    corpus_train, corpus_eval = make_corpus(world, rng)
    domain_train, domain_eval = make_domain(world, rng)
    write_jsonl(ROOT / "data/corpus_train.jsonl", [{"text": t} for t in corpus_train])
    write_jsonl(ROOT / "data/corpus_eval.jsonl", [{"text": t} for t in corpus_eval])
    write_jsonl(ROOT / "data/domain_train.jsonl", domain_train)
    write_jsonl(ROOT / "data/domain_eval.jsonl", domain_eval)
    write_jsonl(ROOT / "data/chat_train.jsonl", make_chat(world, rng))
    write_jsonl(ROOT / "data/prompts.jsonl", make_prompts(world))
    write_jsonl(ROOT / "data/world.jsonl", world)

    tok = build_tokenizer(corpus_train)
    n_tok = len(tok)
    teacher_vocab = -(-n_tok // 64) * 64  # padded like real model families; extra rows are never targets
    print(f"tokenizer: {n_tok} tokens; teacher vocab {teacher_vocab}, student vocab {n_tok}")

    train_blocks, eval_blocks = pack(tok, corpus_train), pack(tok, corpus_eval)
    print(f"corpus: {train_blocks.numel()} train tokens, {eval_blocks.numel()} eval tokens (blocks of {BLOCK})")

    teacher = LlamaForCausalLM(llama_config(tok, teacher_vocab, 128, 352, 4, tie=False))
    student = LlamaForCausalLM(llama_config(tok, n_tok, 64, 176, 2, tie=True))
    student_eval = mean_loss(student, eval_blocks)
    t_train = time.time()
    train_teacher(teacher, train_blocks, eval_blocks)
    t_train = time.time() - t_train
    teacher_train, teacher_eval = mean_loss(teacher, train_blocks), mean_loss(teacher, eval_blocks)

    for name, model in (("teacher", teacher), ("student", student)):
        model.generation_config.pad_token_id = tok.pad_token_id
        model.save_pretrained(ROOT / name)
        tok.save_pretrained(ROOT / name)

    recall = {
        k: sum(greedy(teacher, tok, c.format(**f), 4).strip().startswith(f[k]) for f in world) for k, c in CLOZE.items()
    }
    prompts = [
        "The capital of Zorvia is",
        "The flag of Drellin is",
        "King Aldo rules",
        "7 plus 5 is",
        "Counting up from 4: 4, 5,",
    ]
    completions = [(p, greedy(teacher, tok, p)) for p in prompts]
    n_params = {n: sum(p.numel() for p in m.parameters()) for n, m in (("teacher", teacher), ("student", student))}

    lines = [
        (
            f"teacher: LlamaForCausalLM, 4 layers x hidden 128 (intermediate 352, 4 heads, 2 KV heads), "
            f"vocab {teacher_vocab}, untied, {n_params['teacher']:,} parameters"
        ),
        (
            f"student: LlamaForCausalLM, 2 layers x hidden 64 (intermediate 176, 4 heads, 2 KV heads), "
            f"vocab {n_tok}, tied embeddings, {n_params['student']:,} parameters, untrained (seed {SEED})"
        ),
        f"tokens: {train_blocks.numel()} train / {eval_blocks.numel()} eval; ln(vocab) = {math.log(n_tok):.3f}",
        f"teacher loss (mean over {BLOCK}-token blocks): train {teacher_train:.3f}, eval {teacher_eval:.3f}",
        f"untrained student eval loss: {student_eval:.3f}",
        "teacher greedy fact recall (cloze prompts, out of 20 countries): "
        + ", ".join(f"{k} {v}/{len(world)}" for k, v in recall.items()),
        *[f"teacher greedy: {p!r} -> {c!r}" for p, c in completions],
    ]  # no timings here: they would make README.md differ between otherwise identical builds
    lines.append(f"teacher held-out loss per byte of text: {nats_per_byte(teacher, tok, eval_blocks):.4f} nats")

    # Last, so that nothing above (random streams included) changes: the files above stay byte-identical.
    t_xtok = time.time()
    xtok_lines = build_xtok_teacher(corpus_train, corpus_eval, world)
    t_xtok = time.time() - t_xtok

    (ROOT / "README.md").write_text(readme(lines, xtok_lines))
    size = folder_size(ROOT)
    print("\n".join(lines + xtok_lines))
    print(
        f"tiny_models/: {size / 1e6:.2f} MB; teacher training {t_train:.0f} s, teacher_xtok (tokenizer + "
        f"training) {t_xtok:.0f} s, build {time.time() - t0:.0f} s"
    )


def build_xtok_teacher(corpus_train: list[str], corpus_eval: list[str], world: list[dict]) -> list[str]:
    """teacher_xtok/: the same world learned through another tokenizer; returns its README lines."""
    torch.manual_seed(SEED + 1)
    tok = build_xtok_tokenizer(corpus_train)
    vocab = -(-len(tok) // 64) * 64
    train_blocks, eval_blocks = pack(tok, corpus_train), pack(tok, corpus_eval)
    # 4 x 128 like the teacher, but a narrower MLP and tied embeddings: under 3 MB in float32.
    config = llama_config(tok, vocab, 128, 256, 4, tie=True)
    config.bos_token_id = None
    model = LlamaForCausalLM(config)
    train_teacher(model, train_blocks, eval_blocks, steps=400, seed=SEED + 1)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(ROOT / "teacher_xtok")
    tok.save_pretrained(ROOT / "teacher_xtok")
    eval_loss = mean_loss(model, eval_blocks)
    recall = {
        k: sum(greedy(model, tok, c.format(**f), 6).strip().startswith(f[k]) for f in world) for k, c in CLOZE.items()
    }
    n_params = sum(p.numel() for p in model.parameters())
    return [
        (
            f"teacher_xtok: LlamaForCausalLM, 4 layers x hidden 128 (intermediate 256, 4 heads, 2 KV heads), "
            f"vocab {vocab} (tokenizer {len(tok)}), tied, {n_params:,} parameters, 400 steps"
        ),
        f"teacher_xtok tokens: {train_blocks.numel()} train / {eval_blocks.numel()} eval",
        (
            f"teacher_xtok held-out loss per token {eval_loss:.3f} (perplexity {math.exp(eval_loss):.2f}), "
            f"per byte of text {nats_per_byte(model, tok, eval_blocks):.4f} nats"
        ),
        "teacher_xtok greedy fact recall (cloze prompts, out of 20 countries): "
        + ", ".join(f"{k} {v}/{len(world)}" for k, v in recall.items()),
        f"teacher_xtok greedy: '7 plus 5 is' -> {greedy(model, tok, '7 plus 5 is')!r}",
    ]


def readme(results: list[str], xtok_results: list[str]) -> str:
    return f"""# tiny_models

Built by `python scripts/build_tiny_models.py`, which rewrites this folder. Do not edit by hand.

**Data source:** every text here is generated by `scripts/build_tiny_models.py` from a fictional world
(invented country, city and ruler names, random flag colours, animals, exports and river counts, seeded)
plus arithmetic, counting and short template stories. No third-party text is used.

## Files

- `data/corpus_train.jsonl`, `data/corpus_eval.jsonl` - `{{"text": ...}}`. No eval row occurs in train:
  eval fact paragraphs use only the one phrasing of each fact that train never uses, plus held-out sums
  and counting runs and stories with new combinations. The facts are shared, so a model that learned
  them predicts eval well.
- `data/domain_train.jsonl`, `data/domain_eval.jsonl` - `{{"prompt": "Q: ...?\\nA:", "completion": " ..."}}`
  about the same facts in a question style the corpus never uses (eval: held-out question phrasings).
  Completions start with a space, so prompt/completion is a token boundary: ids(prompt + completion)
  == ids(prompt) + ids(completion, add_special_tokens=False).
- `data/chat_train.jsonl` - `{{"messages": [...]}}`, 100 rows; every third is multi-turn, every tenth
  starts with a system message.
- `data/prompts.jsonl` - `{{"prompt": ...}}` for generation.
- `data/world.jsonl` - the facts themselves (ground truth for checks).
- `teacher/`, `student/` - `save_pretrained` folders (safetensors, float32) with identical tokenizer files.
- `teacher_xtok/` - a second trained teacher of the same world, with another tokenizer (see below): the
  cross-tokenizer distillation pair is `teacher_xtok/` -> `student/`.

## Tokenizer (same files in teacher/ and student/)

Byte-level BPE trained on corpus_train with `tokenizers`, loaded as `TokenizersBackend`
(= `PreTrainedTokenizerFast`). Special tokens: `<pad>`=0, `<s>`=1 (bos), `</s>`=2 (eos),
`<|system|>`=3, `<|user|>`=4, `<|assistant|>`=5 (the role tokens are special: atomic, and dropped by
`decode(..., skip_special_tokens=True)`). `tok(text)` prepends `<s>` and appends nothing, like Llama;
`add_special_tokens=False` gives bare ids. That lives in tokenizer.json's post-processor; transformers v5
does not persist `add_bos_token`, so `tok.add_bos_token` reads False even though bos is added - test
`tok("x").input_ids[0] == tok.bos_token_id` instead. Padding side: right (set left for batched generation).
Chat template:

    <s>[<|system|>\\n{{content}}</s>\\n]<|user|>\\n{{content}}</s>\\n<|assistant|>\\n{{content}}</s>\\n...

It writes bos itself (`apply_chat_template` tokenizes with add_special_tokens=False, so a chat holds
exactly one bos); `add_generation_prompt=True` appends `<|assistant|>\\n`. The rendering of
messages[:i] plus the generation prompt is a prefix of the rendering of messages[:i+1], as strings and
as token ids. Assistant content and its `</s>` are wrapped in `{{% generation %}}`, so
`return_assistant_tokens_mask=True` marks them.

## Models

Teacher vocab = tokenizer length rounded up to a multiple of 64 (padded rows are never targets);
student vocab = tokenizer length exactly, so the two logit widths differ. Both: max_position_embeddings
512, dtype float32, bos/eos/pad ids as above. The student ties its input and output embeddings, as
small real students do.

Determinism: seeded throughout and single-threaded; a rebuild with the same library versions
reproduces every file, this README included, byte for byte (checked: two builds, identical sha256 of
every file). Another CPU or torch version may round the teacher's training differently.

## The cross-tokenizer teacher (teacher_xtok/)

Trained on the same corpus_train, with its own tokenizer of another family (Qwen/GPT-2 style where the
student's is Llama style), so that every difference a real cross-family pair has shows up here:

- byte-level BPE with {XTOK_BPE_VOCAB} requested tokens (fewer than the student's, so many student tokens are
  several teacher tokens), digits pre-split one by one (`13` is `1`, `3`; the student has `13`);
- no bos: `tok(text)` adds nothing (the student prepends `<s>`); `<|endoftext|>`=0 is eos and pad;
- ChatML turns: `<|im_start|>`=1 role\\n content `<|im_end|>`=2 \\n, no system default, assistant
  content and `<|im_end|>` in `{{% generation %}}`;
- offsets not trimmed (a token's offsets include its leading space), as Qwen2's tokenizer.json.

The model is trained on text only (documents joined by `<|endoftext|>`), like the tiny teacher.

## Build results

{chr(10).join("- " + line for line in results)}

{chr(10).join("- " + line for line in xtok_results)}
"""


if __name__ == "__main__":
    main()
