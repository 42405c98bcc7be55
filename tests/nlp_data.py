"""Generated NER and extractive-QA sets for the real-encoder tests (seeded templates, no download).

Train and held-out evaluation draw their names from **disjoint** lists (people, cities, organisations,
products), so a held-out score measures whether the model learned the task from context, not the names.
Same seed, same records.
"""

from __future__ import annotations

import random

NER_TAGS = ["O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"]

# (train, eval): no name of an eval list occurs in a train list (asserted by the tests)
FIRST = (["anna", "lukas", "maria", "tomas", "elena", "jonas", "sofia", "david", "clara", "peter", "laura", "marco",
          "nina", "oscar", "irene", "felix", "helen", "victor", "paula", "simon"],
         ["grace", "henrik", "alice", "mateo", "yara", "boris", "ingrid", "rafael", "leila", "stefan"])
LAST = (["berg", "novak", "smith", "keller", "rossi", "meyer", "costa", "larsen", "weber", "silva", "moreau", "brown",
         "fischer", "lopez", "walsh", "kowalski", "jensen", "bauer", "martin", "petrov"],
        ["okafor", "lindqvist", "tanaka", "duarte", "hughes", "varga", "nakamura", "ferreira", "olsen", "dubois"])
CITY = (["paris", "berlin", "madrid", "oslo", "vienna", "prague", "lisbon", "warsaw", "dublin", "zurich", "milan", "lyon",
         "new york", "los angeles", "buenos aires", "hong kong", "rio de janeiro", "cape town"],
        ["tokyo", "helsinki", "athens", "toronto", "budapest", "seoul", "san francisco", "mexico city", "tel aviv", "kuala lumpur"])
ORG_HEAD = (["acme", "lumen", "northwind", "bluepeak", "silverline", "redwood", "ironbridge", "greenfield", "starlight",
             "oakridge", "brightwater", "stonegate"],
            ["quantix", "harborview", "sunvale", "maplecrest", "falconer", "windmere"])
ORG_TAIL = (["systems", "bank", "labs", "group", "motors", "foods"], ["systems", "bank", "labs", "group", "motors", "foods"])
PRODUCT = (["solar batteries", "coffee machines", "electric bikes", "hearing aids", "garden tools", "smart locks", "wind turbines",
            "baby strollers"],
           ["water filters", "drone cameras", "ski boots", "office chairs", "heat pumps"])

NER_TEMPLATES = [
    "{PER} moved to {LOC} last year .",
    "{PER} works for {ORG} in {LOC} .",
    "yesterday {PER} met the board of {ORG} .",
    "the office of {ORG} in {LOC} is closed today .",
    "{ORG} hired {PER} as its new director .",
    "we flew from {LOC} to {LOC} with {PER} .",
    "according to {PER} , {ORG} will open a store in {LOC} .",
    "{PER} and {PER} founded {ORG} .",
    "the weather in {LOC} was cold this week .",
    "shares of {ORG} rose after the report .",
    "i had lunch with {PER} near the station .",
    "{ORG} signed a deal with {ORG} on monday .",
    "after ten years in {LOC} , {PER} returned home .",
    "a spokesperson for {ORG} declined to comment .",
    "{PER} said the meeting in {LOC} went well .",
    "nobody called about the delivery today .",
]


def _names(split: int, rng: random.Random) -> dict[str, str]:
    return {"PER": f"{rng.choice(FIRST[split])} {rng.choice(LAST[split])}",
            "LOC": rng.choice(CITY[split]),
            "ORG": f"{rng.choice(ORG_HEAD[split])} {rng.choice(ORG_TAIL[split])}"}


def ner_records(n: int, *, split: str, seed: int = 0) -> list[dict]:
    """``n`` {"tokens", "tags"} sentences (BIO: PER, LOC, ORG); ``split`` "train" or "eval" picks the name lists."""
    s = {"train": 0, "eval": 1}[split]
    rng = random.Random(f"ner-{split}-{seed}")
    out = []
    for _ in range(n):
        toks, tags = [], []
        for piece in rng.choice(NER_TEMPLATES).split():
            if piece.startswith("{") and piece.endswith("}"):
                label = piece[1:-1]
                words = _names(s, rng)[label].split()
                toks += words
                tags += [f"B-{label}"] + [f"I-{label}"] * (len(words) - 1)
            else:
                toks.append(piece)
                tags.append("O")
        out.append({"tokens": toks, "tags": tags})
    return out


FILLER = [
    "The region has a mild climate and a busy harbour.",
    "Local newspapers covered the story for several weeks.",
    "Analysts expect the market to grow over the next decade.",
    "The building next door used to be a cinema.",
    "Many visitors arrive by train in the summer months.",
    "The annual report was published in the spring.",
    "A small museum near the river tells the history of the town.",
    "Traffic in the city centre is heavy in the morning.",
]

QA_FACTS = [  # (sentence with {ORG} etc., question about it, the slot that answers it; the year is asked of the first)
    ("{ORG} was founded in {YEAR} by {PER}.", "Who founded {ORG}?", "PER"),
    ("Its headquarters are in {LOC}.", "Where are the headquarters of {ORG}?", "LOC"),
    ("The company makes {PRODUCT}.", "What does {ORG} make?", "PRODUCT"),
    ("Today it employs {N} people.", "How many people does {ORG} employ?", "N"),
]
YEAR_Q = ("When was {ORG} founded?", "YEAR", 0)


def qa_records(n_contexts: int, *, split: str, seed: int = 0, filler: int = 4) -> list[dict]:
    """SQuAD records: each context describes one company (founder, year, city, product, staff) between
    ``filler`` unrelated sentences (so contexts run past one short window), with one question per fact.
    ``split`` "train" or "eval" picks disjoint name lists: held-out questions are on unseen contexts."""
    s = {"train": 0, "eval": 1}[split]
    rng = random.Random(f"qa-{split}-{seed}")
    out = []
    for _ in range(n_contexts):
        slots = {**_names(s, rng), "PRODUCT": rng.choice(PRODUCT[s]), "YEAR": str(rng.randint(1950, 2015)),
                 "N": str(rng.choice([rng.randint(12, 99), rng.randint(100, 9000)]))}
        slots = {k: (v if k in ("YEAR", "N", "PRODUCT") else v.title()) for k, v in slots.items()}
        fill = rng.sample(FILLER, filler)
        sentences = [f.format(**slots) for f, _, _ in QA_FACTS]
        # fillers before, between and after the facts: the answer's position varies
        body = fill[: filler // 2] + sentences[:2] + fill[filler // 2 : filler - 1] + sentences[2:] + fill[filler - 1 :]
        context = " ".join(body)
        qs = [(q, slot, i) for i, (_, q, slot) in enumerate(QA_FACTS)] + [YEAR_Q]
        for q, slot, i in qs:
            answer, sentence = slots[slot], sentences[i]  # the fact's own sentence (a staff count may be "19" of "1975")
            start = context.index(sentence) + sentence.index(answer)
            out.append({"question": q.format(**slots), "context": context,
                        "answers": {"text": [answer], "answer_start": [start]}})
    return out
