"""An offline grammar probe: BLiMP-style minimal pairs built from lmp's own templates and lexicon.

Every pair differs in one grammatical choice, so a model that prefers the good sentence has
learned that piece of grammar. The lexicon uses plain, frequent English words (the demo corpus,
the Bible in Basic English and everyday dialogue, has them all), so even a tiny model on the
built-in corpus gets a meaningful grammar score with no download. Generation is a pure function
of the seed: the same seed gives the same pairs on every machine.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Callable

from lm_pretrain.eval.tasks import Item

# (singular, plural, gender: m / f / n)
NOUNS = [
    ("man", "men", "m"),
    ("woman", "women", "f"),
    ("king", "kings", "m"),
    ("queen", "queens", "f"),
    ("boy", "boys", "m"),
    ("girl", "girls", "f"),
    ("father", "fathers", "m"),
    ("mother", "mothers", "f"),
    ("son", "sons", "m"),
    ("daughter", "daughters", "f"),
    ("brother", "brothers", "m"),
    ("sister", "sisters", "f"),
    ("child", "children", "n"),
    ("servant", "servants", "n"),
    ("friend", "friends", "n"),
    ("teacher", "teachers", "n"),
    ("farmer", "farmers", "n"),
    ("soldier", "soldiers", "n"),
]
THINGS = [("house", "houses"), ("tree", "trees"), ("book", "books"), ("door", "doors"), ("horse", "horses"),
          ("city", "cities"), ("field", "fields"), ("river", "rivers"), ("stone", "stones"), ("ship", "ships")]  # fmt: skip
# (third person singular, plural/base)
INTRANSITIVE = [("walks", "walk"), ("sleeps", "sleep"), ("speaks", "speak"), ("comes", "come"),
                ("goes", "go"), ("runs", "run"), ("sings", "sing"), ("works", "work"), ("waits", "wait"),
                ("laughs", "laugh"), ("weeps", "weep"), ("says", "say")]  # fmt: skip
# (simple past, past participle): using the participle as a past tense is the error
IRREGULAR = [("saw", "seen"), ("took", "taken"), ("ate", "eaten"), ("gave", "given"), ("went", "gone"),
             ("wrote", "written"), ("broke", "broken"), ("knew", "known"), ("fell", "fallen"),
             ("spoke", "spoken"), ("did", "done"), ("began", "begun"), ("drank", "drunk"),
             ("chose", "chosen"), ("forgot", "forgotten")]  # fmt: skip
IRREGULAR_OBJECT = {"went": "to the city", "fell": "to the ground", "spoke": "to the king",
                    "began": "the work", "drank": "the water", "did": "the work"}  # fmt: skip
REFLEXIVE_VERBS = ["saw", "hurt", "helped", "loved", "blamed", "praised", "knew", "kept"]
PLACES = ["in the house", "near the river", "by the door", "in the field", "at the gate", "in the city"]
ADJECTIVES = ["happy", "old", "good", "tired", "here", "wise", "afraid", "ready"]
REFLEXIVE = {"m": "himself", "f": "herself", "n": "himself", "pl": "themselves"}


def _pick(rng: random.Random, options: list):
    return options[rng.randrange(len(options))]


def _noun(rng: random.Random, plural: bool) -> str:
    singular, plural_form, _ = _pick(rng, NOUNS)
    return plural_form if plural else singular


def _cap(text: str) -> str:
    return text[0].upper() + text[1:]


def subject_verb_agreement(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    sg, pl = _pick(rng, INTRANSITIVE)
    noun = _noun(rng, plural)
    good, bad = (pl, sg) if plural else (sg, pl)
    return f"The {noun} {good}.", f"The {noun} {bad}."


def agreement_across_prepositional_phrase(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    noun = _noun(rng, plural)
    thing_sg, thing_pl = _pick(rng, THINGS)
    distractor = thing_sg if plural else thing_pl  # opposite number: a tempting wrong cue
    sg, pl = _pick(rng, INTRANSITIVE)
    good, bad = (pl, sg) if plural else (sg, pl)
    prep = _pick(rng, ["near", "by", "behind", "beside"])
    return f"The {noun} {prep} the {distractor} {good}.", f"The {noun} {prep} the {distractor} {bad}."


def agreement_across_relative_clause(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    noun = _noun(rng, plural)
    other = _noun(rng, not plural)
    verb = _pick(rng, REFLEXIVE_VERBS)
    adjective = _pick(rng, ADJECTIVES)
    good, bad = ("are", "is") if plural else ("is", "are")
    clause = f"The {noun} who {verb} the {other}"
    return f"{clause} {good} {adjective}.", f"{clause} {bad} {adjective}."


def determiner_noun_agreement(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    thing_sg, thing_pl = _pick(rng, THINGS)
    near = rng.random() < 0.5
    det_sg, det_pl = ("this", "these") if near else ("that", "those")
    subject = _noun(rng, rng.random() < 0.5)
    verb = _pick(rng, ["saw", "took", "made", "found", "had"])
    start = f"The {subject} {verb}"
    if plural:
        return f"{start} {det_pl} {thing_pl}.", f"{start} {det_sg} {thing_pl}."
    return f"{start} {det_sg} {thing_sg}.", f"{start} {det_pl} {thing_sg}."


def irregular_past_tense(rng: random.Random) -> tuple[str, str]:
    past, participle = _pick(rng, IRREGULAR)
    noun = _noun(rng, rng.random() < 0.5)
    rest = IRREGULAR_OBJECT.get(past, "the " + _pick(rng, THINGS)[0])
    return f"The {noun} {past} {rest}.", f"The {noun} {participle} {rest}."


def anaphor_number_agreement(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    singular, plural_form, gender = _pick(rng, NOUNS)
    noun = plural_form if plural else singular
    good = REFLEXIVE["pl"] if plural else REFLEXIVE[gender]
    bad = REFLEXIVE["m" if gender == "n" else gender] if plural else REFLEXIVE["pl"]
    verb = _pick(rng, REFLEXIVE_VERBS)
    return f"The {noun} {verb} {good}.", f"The {noun} {verb} {bad}."


def anaphor_gender_agreement(rng: random.Random) -> tuple[str, str]:
    singular, _, gender = _pick(rng, [n for n in NOUNS if n[2] != "n"])
    good, bad = ("himself", "herself") if gender == "m" else ("herself", "himself")
    verb = _pick(rng, REFLEXIVE_VERBS)
    return f"The {singular} {verb} {good}.", f"The {singular} {verb} {bad}."


def existential_there_agreement(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    thing_sg, thing_pl = _pick(rng, THINGS)
    place = _pick(rng, PLACES)
    if plural:
        quantity = _pick(rng, ["two", "three", "many", "some"])
        return f"There are {quantity} {thing_pl} {place}.", f"There is {quantity} {thing_pl} {place}."
    return f"There is a {thing_sg} {place}.", f"There are a {thing_sg} {place}."


def do_support_base_form(rng: random.Random) -> tuple[str, str]:
    sg, base = _pick(rng, INTRANSITIVE)
    noun = _noun(rng, rng.random() < 0.5)
    aux = _pick(rng, ["did not", "does not", "will not", "can not"])
    if aux == "does not" and noun not in {n[0] for n in NOUNS}:
        aux = "do not"  # keep the auxiliary itself grammatical
    return f"The {noun} {aux} {base}.", f"The {noun} {aux} {sg}."


def question_auxiliary_agreement(rng: random.Random) -> tuple[str, str]:
    plural = rng.random() < 0.5
    noun = _noun(rng, plural)
    adjective = _pick(rng, ADJECTIVES)
    good, bad = ("Are", "Is") if plural else ("Is", "Are")
    return f"{good} the {noun} {adjective}?", f"{bad} the {noun} {adjective}?"


# uid -> (field, generator)
PHENOMENA: dict[str, tuple[str, Callable[[random.Random], tuple[str, str]]]] = {
    "subject_verb_agreement": ("morphology", subject_verb_agreement),
    "agreement_across_prepositional_phrase": ("morphology", agreement_across_prepositional_phrase),
    "agreement_across_relative_clause": ("morphology", agreement_across_relative_clause),
    "determiner_noun_agreement": ("morphology", determiner_noun_agreement),
    "irregular_past_tense": ("morphology", irregular_past_tense),
    "anaphor_number_agreement": ("morphology", anaphor_number_agreement),
    "anaphor_gender_agreement": ("morphology", anaphor_gender_agreement),
    "existential_there_agreement": ("syntax", existential_there_agreement),
    "do_support_base_form": ("syntax", do_support_base_form),
    "question_auxiliary_agreement": ("syntax", question_auxiliary_agreement),
}


def probe_items(seed: int = 0, per_phenomenon: int = 100) -> list[Item]:
    """`per_phenomenon` distinct minimal pairs for each phenomenon (fewer if the templates run out)."""
    items = []
    for uid, (field, make) in PHENOMENA.items():
        # a stable per-phenomenon stream: adding a phenomenon never changes the others' pairs
        rng = random.Random(seed * 1_000_003 + zlib.crc32(uid.encode()))
        seen: set[tuple[str, str]] = set()
        for _ in range(per_phenomenon * 20):
            if len(seen) == per_phenomenon:
                break
            good, bad = make(rng)
            pair = (_cap(good), _cap(bad))
            if pair in seen or pair[0] == pair[1]:
                continue
            seen.add(pair)
            items.append(Item(uid, pair, pair, field, uid.replace("_", " "), str(len(seen) - 1)))
    return items
