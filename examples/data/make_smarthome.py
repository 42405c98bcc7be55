"""Writes smarthome_train.jsonl / smarthome_eval.jsonl: a device-command assistant.

The assistant turns a spoken request into one compact JSON command an edge hub executes.
Deterministic (seeded); rerun to regenerate: python examples/data/make_smarthome.py

smarthome_{train,eval}_plain.jsonl hold the same requests as prompt/completion records (the system line,
the request, a newline; the command as completion) for base models without a chat template (Gemma 3 270M's
GGUF: examples/gemma3-270m-lora-cpu.toml).
"""

import json
import random
from pathlib import Path

SYSTEM = "You control a smart home. Reply with one JSON command only."
ROOMS = ["kitchen", "living room", "bedroom", "bathroom", "office", "garage", "hallway", "kids room"]
TEMPLATES = [
    ("Turn on the {room} lights", lambda r, n: {"device": "light", "room": r, "action": "on"}),
    ("Switch off the lights in the {room}", lambda r, n: {"device": "light", "room": r, "action": "off"}),
    ("Dim the {room} lights to {n} percent", lambda r, n: {"device": "light", "room": r, "action": "dim", "level": n}),
    ("Set the {room} thermostat to {t} degrees", lambda r, n: {"device": "thermostat", "room": r, "action": "set", "celsius": 16 + n % 10}),
    ("Open the {room} blinds", lambda r, n: {"device": "blinds", "room": r, "action": "open"}),
    ("Close the blinds in the {room}", lambda r, n: {"device": "blinds", "room": r, "action": "close"}),
    ("Play some music in the {room}", lambda r, n: {"device": "speaker", "room": r, "action": "play"}),
    ("Stop the music in the {room}", lambda r, n: {"device": "speaker", "room": r, "action": "stop"}),
    ("Set a timer for {n} minutes", lambda r, n: {"device": "timer", "action": "start", "minutes": n}),
    ("Lock the front door", lambda r, n: {"device": "lock", "room": "front door", "action": "lock"}),
    ("Is the {room} window open?", lambda r, n: {"device": "window", "room": r, "action": "status"}),
    ("Start the vacuum in the {room}", lambda r, n: {"device": "vacuum", "room": r, "action": "start"}),
]
POLITE = ["", "Please ", "Hey, ", "Could you "]


def make(n: int, seed: int, exclude: set[str] = frozenset()) -> list[dict]:
    """``n`` requests; none whose request text (case and whitespace folded) is in ``exclude``."""
    rng = random.Random(seed)
    out = []
    seen = set(exclude) if exclude else None
    while len(out) < n:
        text, fn = rng.choice(TEMPLATES)
        room, num = rng.choice(ROOMS), rng.randrange(5, 95, 5)
        cmd = fn(room, num)
        prefix, body = rng.choice(POLITE), text.format(room=room, n=num, t=16 + num % 10)
        prompt = prefix + (body[0].lower() + body[1:] if prefix else body)
        if seen is not None:
            key = " ".join(prompt.lower().split())
            if key in seen:
                continue
            seen.add(key)
        out.append({"messages": [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": json.dumps(cmd, separators=(",", ":"))},
        ]})
    return out


def plain(rec: dict) -> dict:
    """A chat record as prompt/completion: no chat template needed (ends with a newline: a token boundary)."""
    system, user, answer = (m["content"] for m in rec["messages"])
    return {"prompt": f"{system}\n{user}\n", "completion": answer}


if __name__ == "__main__":
    here = Path(__file__).parent
    train = make(320, 1)
    # held out means held out: no eval request occurs in the training data (`edgetune build` refuses overlap)
    seen = {" ".join(r["messages"][1]["content"].lower().split()) for r in train}
    evals = make(40, 2, exclude=seen)
    for name, recs in (("smarthome_train.jsonl", train), ("smarthome_eval.jsonl", evals)):
        with open(here / name, "w") as f:
            for rec in recs:
                f.write(json.dumps(rec) + "\n")
        with open(here / name.replace(".jsonl", "_plain.jsonl"), "w") as f:
            for rec in recs:
                f.write(json.dumps(plain(rec)) + "\n")
