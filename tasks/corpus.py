"""The language model's built-in corpus: short generated fables, shipped as ``data/fables.txt``.

A fresh clone trains the language model without downloading anything: the default corpus
is generated here from a small hand-written grammar (a few hundred words: characters,
places, objects, actions) with a seeded generator, and written once into the package. Its
sentences have agreement, reused characters within a story and a closing moral, so a
model has long-range structure to learn. The text is ours (no source text is copied).

Example:
    >>> lines = generate_fables(stories=2, seed=0).splitlines()
    >>> len(lines) > 4 and all(line.endswith(".") for line in lines)
    True
    >>> generate_fables(stories=2, seed=0) == generate_fables(stories=2, seed=0)
    True
"""

from __future__ import annotations

import random
from pathlib import Path

__all__ = ["generate_fables", "FABLES_PATH", "FABLES_STORIES", "FABLES_SEED"]

FABLES_PATH = Path(__file__).resolve().parent / "data" / "fables.txt"
FABLES_STORIES = 500
FABLES_SEED = 2406

CREATURES = ("fox", "crow", "hare", "tortoise", "wolf", "lamb", "owl", "mouse", "lion", "goat", "heron", "frog",
             "ant", "grasshopper", "bear", "badger", "otter", "sparrow", "stag", "boar", "weasel", "magpie",
             "beetle", "swan", "mole", "rabbit", "cat", "dog", "horse", "donkey", "rooster", "hen", "duck", "eel",
             "crab", "spider", "bee", "falcon", "raven", "squirrel")
ADJECTIVES = ("old", "young", "clever", "foolish", "proud", "humble", "hungry", "tired", "quick", "slow", "greedy",
              "kind", "brave", "timid", "lazy", "patient", "noisy", "quiet", "small", "great", "grey", "golden",
              "wise", "careless", "honest", "sly", "gentle", "bold", "weary", "cheerful")
PLACES = ("the river", "the meadow", "the old mill", "the forest", "the hill", "the orchard", "the marsh",
          "the barn", "the well", "the bridge", "the garden", "the cave", "the village", "the road", "the lake",
          "the valley", "the field of barley", "the edge of the wood", "the hollow oak", "the stone wall")
OBJECTS = ("a piece of cheese", "a bag of grain", "a ripe pear", "a golden key", "a loaf of bread", "a bright coin",
           "a jar of honey", "a red apple", "a warm coat", "a basket of eggs", "a silver bell", "a handful of nuts",
           "a feather", "a fishing line", "a lantern", "a map", "a drum", "a ball of wool", "a clay pot", "a seed")
MOVES = ("walked", "ran", "hurried", "wandered", "crept", "flew", "swam", "climbed", "hopped", "trotted")
WANTS = ("wanted", "hoped to find", "was looking for", "dreamed of", "had lost", "had been promised")
SAYS = ("said", "asked", "cried", "whispered", "answered", "laughed", "sighed", "called")
TIMES = ("One morning", "Long ago", "On a cold night", "In the spring", "At the end of summer", "One rainy day",
         "Before dawn", "In the autumn", "At noon", "One winter")
FEELINGS = ("glad", "ashamed", "angry", "afraid", "surprised", "grateful", "sorry", "proud", "sad", "calm")
MORALS = ("slow and steady wins the race", "a friend in need is a friend indeed", "pride comes before a fall",
          "look before you leap", "honesty is the best policy", "do not count your eggs before they hatch",
          "many hands make light work", "kindness is never wasted", "greed loses all it has",
          "those who help others help themselves", "appearances can deceive", "patience is a virtue",
          "a small gift given gladly is worth more than a great one", "work today and rest tomorrow",
          "it is easy to be brave from a safe distance", "the best of plans can fail")
QUESTIONS = ("where are you going", "what do you carry", "will you help me", "why are you so {feeling}",
             "may I come with you", "have you seen {object}")
ANSWERS = ("I am going to {place}", "I carry {object}", "I will help you if you help me", "leave me alone",
           "come with me to {place}", "I have no time for you")


def _creature(rng: random.Random) -> str:
    return f"{rng.choice(ADJECTIVES)} {rng.choice(CREATURES)}"


def _story(rng: random.Random) -> list[str]:
    hero, other = _creature(rng), _creature(rng)
    place, thing = rng.choice(PLACES), rng.choice(OBJECTS)
    fill = {"place": rng.choice(PLACES), "object": rng.choice(OBJECTS), "feeling": rng.choice(FEELINGS)}
    lines = [f"{rng.choice(TIMES)} the {hero} {rng.choice(MOVES)} to {place} because it {rng.choice(WANTS)} {thing}.",
             f"There the {hero} met the {other}.",
             f"\"{rng.choice(QUESTIONS).format(**fill)}\" {rng.choice(SAYS)} the {hero}.",
             f"\"{rng.choice(ANSWERS).format(**fill)}\" {rng.choice(SAYS)} the {other}."]
    for _ in range(rng.randint(0, 3)):
        who = rng.choice((hero, other))
        lines.append(f"Then the {who} {rng.choice(MOVES)} to {rng.choice(PLACES)} and felt {rng.choice(FEELINGS)}.")
    ending = rng.random()
    if ending < 0.5:
        lines.append(f"In the end the {hero} found {thing} at {rng.choice(PLACES)}.")
    else:
        lines.append(f"In the end the {other} kept {thing} and the {hero} went home {rng.choice(FEELINGS)}.")
    lines.append(f"And so we learn that {rng.choice(MORALS)}.")
    return lines


def generate_fables(stories: int = FABLES_STORIES, seed: int = FABLES_SEED) -> str:
    """``stories`` fables, one sentence per line, deterministic in ``seed``."""
    rng = random.Random(seed)
    return "\n".join(line for _ in range(stories) for line in _story(rng)) + "\n"
