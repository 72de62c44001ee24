"""Review titles and texts whose sentiment follows the rating, but not trivially.

A review is a few sentences drawn from pools of different polarity: plain praise
and complaints, negated phrases ("not bad at all", "not worth it"), mixed
sentences ("great fit but the zipper broke"), neutral filler, and (sparingly)
sarcasm, whose words are positive while the rating is low. The rating sets the
mixture of pools, so a lexicon scorer such as VADER correlates clearly with the
rating without reproducing it. A few reviewers also write text that belongs to a
neighbouring rating, as real ones do.

Everything is drawn from a ``random.Random`` passed in, so a seed fixes the text.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# --- vocabulary per product category ---------------------------------------------------


@dataclass(frozen=True)
class Category:
    name: str
    products: tuple[str, ...]
    parts: tuple[str, ...]
    praise: tuple[str, ...]  # clauses: "it fits perfectly"
    faults: tuple[str, ...]  # clauses: "the zipper broke"
    median_price: float
    peak_day_of_year: int  # yearly seasonality peak
    demand: float  # category demand level: multiplies every SKU's popularity (mean 1.0)
    brands: tuple[str, ...]  # brands a SKU of the category is made by
    related: str  # the category a re-categorised SKU moves to


CATEGORIES: tuple[Category, ...] = (
    Category(
        "apparel",
        ("rain jacket", "hoodie", "wool sweater", "denim jacket", "t-shirt", "winter coat"),
        ("zipper", "stitching", "fabric", "seams", "hood", "pockets"),
        ("it fits perfectly", "it is true to size", "it keeps me warm", "the fabric feels soft"),
        ("the zipper broke", "it shrank after one wash", "the seams came apart", "it runs small"),
        39.0,
        300,
        1.25,
        ("Northwind", "Alder & Pine", "Coastline", "Urbanite"),
        "sports",
    ),
    Category(
        "electronics",
        ("wireless headphones", "phone charger", "bluetooth speaker", "smart watch", "webcam"),
        ("battery", "charging port", "cable", "buttons", "screen", "speaker"),
        ("the battery lasts all day", "the sound is crisp", "it pairs instantly"),
        ("the battery died", "it stopped charging", "it keeps disconnecting", "it overheats"),
        59.0,
        340,
        0.8,
        ("Voltix", "Sonora", "Brightwave", "Kestrel"),
        "home",
    ),
    Category(
        "kitchen",
        ("frying pan", "electric kettle", "chef knife", "blender", "coffee grinder"),
        ("handle", "lid", "coating", "blade", "base", "switch"),
        ("it heats evenly", "it cleans up easily", "it is razor sharp", "it is quiet"),
        ("the coating peeled off", "the handle got loose", "it started leaking", "it rusted"),
        29.0,
        330,
        1.0,
        ("Copperleaf", "Hearthstone", "Brisk", "Oakmill"),
        "home",
    ),
    Category(
        "home",
        ("desk lamp", "throw blanket", "bookshelf", "storage box", "wall clock"),
        ("frame", "finish", "legs", "fabric", "screws", "switch"),
        ("it looks great in the living room", "it was easy to assemble", "the finish is lovely"),
        ("a leg snapped", "the finish scratched right away", "pieces were missing"),
        34.0,
        20,
        0.75,
        ("Linden", "Nestwell", "Greyhaven", "Marlow"),
        "kitchen",
    ),
    Category(
        "toys",
        ("building set", "plush bear", "rc car", "puzzle", "board game"),
        ("pieces", "wheels", "remote", "box", "instructions", "paint"),
        ("the kids play with it every day", "it kept my son busy for hours", "it is well made"),
        ("a wheel fell off", "pieces were missing", "the remote stopped working"),
        24.0,
        345,
        0.95,
        ("Tumble", "Brickworks", "Jolly Fox", "Kitewing"),
        "sports",
    ),
    Category(
        "outdoor",
        ("camping tent", "hiking backpack", "sleeping bag", "water bottle", "folding chair"),
        ("poles", "straps", "buckle", "zipper", "seams", "lid"),
        ("it survived a week of rain", "it packs down small", "it is light and sturdy"),
        ("the poles bent", "a strap tore", "it leaks at the seams", "the buckle snapped"),
        69.0,
        180,
        0.6,
        ("Ridgeline", "Trailhead", "Summit Co.", "Fernwood"),
        "sports",
    ),
    Category(
        "beauty",
        ("face cream", "shampoo", "perfume", "hair dryer", "lip balm"),
        ("pump", "cap", "scent", "packaging", "formula"),
        ("my skin feels great", "the scent lasts all day", "a little goes a long way"),
        ("it gave me a rash", "the pump broke", "the scent is gone in an hour"),
        17.0,
        135,
        1.65,
        ("Lumiere", "Petal & Stone", "Aquae", "Velvetine"),
        "home",
    ),
    Category(
        "sports",
        ("yoga mat", "running shoes", "dumbbell set", "bike helmet", "tennis racket"),
        ("grip", "strap", "padding", "laces", "sole", "handle"),
        ("the grip is excellent", "they are comfortable from day one", "it feels solid"),
        ("the sole came off", "the padding flattened", "the strap snapped", "it smells awful"),
        44.0,
        120,
        1.0,
        ("Stride", "Apex", "Fieldhouse", "Pulse"),
        "outdoor",
    ),
)

POS_ADJ = (
    "great",
    "excellent",
    "fantastic",
    "solid",
    "sturdy",
    "lovely",
    "reliable",
    "impressive",
    "well made",
    "comfortable",
)
NEG_ADJ = ("flimsy", "cheap", "disappointing", "useless", "poorly made", "awful", "terrible")
INTENSIFIERS = ("really", "very", "super", "absolutely", "genuinely", "pretty", "")
PERIODS = ("two days", "a week", "three weeks", "a month", "two uses", "the first wash")
PEOPLE = (("daughter", "she"), ("son", "he"), ("wife", "she"), ("husband", "he"), ("dad", "he"))

# --- sentence pools ----------------------------------------------------------------------

POSITIVE = (
    "{intens} {pos} {product}.",
    "Love this {product}!",
    "The {part} feels {pos}.",
    "{Praise} and it looks great.",
    "Exactly what I was looking for.",
    "Bought it for my {person} and {pronoun} loves it.",
    "Worth every penny.",
    "Would definitely buy again.",
    "Highly recommend it.",
    "Best {product} I have owned.",
    "Great value for the price.",
    "Arrived quickly and {praise}.",
    "So happy with this purchase.",
    "{Praise}, which is all I wanted.",
)
POSITIVE_NEGATED = (
    "Not bad at all.",
    "Can't complain.",
    "No complaints so far.",
    "Never had a single issue with it.",
    "Honestly not disappointed.",
    "I did not expect it to be this good.",
    "Nothing to dislike here.",
)
POSITIVE_WITH_CON = (
    "{Praise}, only wish the {part} were a bit sturdier.",
    "Good {product} overall, shipping was slow though.",
    "Solid, but a little pricey.",
    "{Praise}; the {part} could be better.",
    "Very nice, the instructions were confusing though.",
)
NEUTRAL = (
    "It's okay.",
    "Does the job.",
    "Average {product}, nothing special.",
    "It arrived on time.",
    "Pretty much as described.",
    "Not great, not terrible.",
    "Fine for occasional use.",
    "Only used it a couple of times so far.",
    "It is a {product}.",
    "The packaging was plain.",
    "Bought it as a gift.",
    "The color is slightly different from the photos.",
)
MIXED = (
    "{Praise} but {fault}.",
    "Looks nice, but the {part} feels {neg}.",
    "{Pos_cap} design, though {fault}.",
    "Good price, shame {fault}.",
    "I liked it at first, then {fault}.",
    "The {part} is {pos}, the rest not so much.",
)
NEGATIVE = (
    "{Fault} after {period}.",
    "Total waste of money.",
    "The {part} is {neg}.",
    "Very {neg}, returned it.",
    "Skip this one.",
    "Cheaply made and it shows.",
    "Customer service was no help.",
    "Terrible quality, {fault}.",
    "I regret buying this {product}.",
    "It broke within {period}.",
    "Really disappointed with this {product}.",
    "Awful, {fault}.",
    "Horrible {product}, {fault}.",
    "Worst purchase I have made this year.",
    "Broken and useless after {period}.",
    "Very disappointing, {fault}.",
)
NEGATIVE_NEGATED = (
    "Not worth it.",
    "Would not recommend.",
    "Not what I expected.",
    "It does not work as advertised.",
    "Not worth the money.",
    "Doesn't live up to the hype.",
    "Never buying this brand again.",
    "I would not give it to anyone.",
)
SARCASTIC = (
    "Oh great, {fault} after {period}. Just perfect.",
    "Wow, amazing quality: {fault} on day one.",
    "Thanks for the {product} that lasted {period}. Brilliant.",
    "Love how {fault} right after the return window closed. Fantastic.",
)

POOLS: dict[str, tuple[str, ...]] = {
    "pos": POSITIVE,
    "pos_not": POSITIVE_NEGATED,
    "pos_con": POSITIVE_WITH_CON,
    "neutral": NEUTRAL,
    "mixed": MIXED,
    "neg": NEGATIVE,
    "neg_not": NEGATIVE_NEGATED,
}
# Mixture of sentence pools per rating (weights, same order as POOLS).
MIXTURE: dict[int, tuple[float, ...]] = {
    5: (0.70, 0.14, 0.06, 0.10, 0.00, 0.00, 0.00),
    4: (0.50, 0.12, 0.18, 0.15, 0.05, 0.00, 0.00),
    3: (0.12, 0.06, 0.08, 0.38, 0.22, 0.08, 0.06),
    2: (0.03, 0.00, 0.00, 0.12, 0.24, 0.43, 0.18),
    1: (0.00, 0.00, 0.00, 0.04, 0.06, 0.68, 0.22),
}
TITLES: dict[int, tuple[str, ...]] = {
    5: ("Love it", "Great {product}", "Five stars", "Exactly as described", "Worth every penny"),
    4: ("Very good", "Happy with it", "Nice {product}", "Good value", "Almost perfect"),
    3: ("It's okay", "Average", "Does the job", "Mixed feelings", "Meh"),
    2: ("Disappointed", "Not great", "Expected more", "Meh, not worth it", "Mediocre"),
    1: ("Avoid", "Broke quickly", "Waste of money", "Returned it", "Terrible"),
}
SARCASM_RATE = 0.06  # share of 1-2 star reviews written sarcastically
OFF_RATING_RATE = 0.04  # share of reviews whose text belongs to a neighbouring rating
LONG_RATE = 0.02  # share of long, multi-paragraph reviews


def _cap(s: str) -> str:
    return s[:1].upper() + s[1:]


def _fill(template: str, cat: Category, product: str, rnd: random.Random) -> str:
    person, pronoun = rnd.choice(PEOPLE)
    praise = rnd.choice(cat.praise)
    fault = rnd.choice(cat.faults)
    pos = rnd.choice(POS_ADJ)
    text = template.format(
        intens=rnd.choice(INTENSIFIERS),
        pos=pos,
        Pos_cap=_cap(pos),
        neg=rnd.choice(NEG_ADJ),
        product=product,
        part=rnd.choice(cat.parts),
        praise=praise,
        Praise=_cap(praise),
        fault=fault,
        Fault=_cap(fault),
        period=rnd.choice(PERIODS),
        person=person,
        pronoun=pronoun,
    )
    return _cap(text.strip().replace("  ", " "))


def _sentences(rating: int, n: int, cat: Category, product: str, rnd: random.Random) -> list[str]:
    names = list(POOLS)
    picks = rnd.choices(names, weights=MIXTURE[rating], k=n)
    # dict.fromkeys drops a sentence drawn twice, keeping the order.
    return list(dict.fromkeys(_fill(rnd.choice(POOLS[p]), cat, product, rnd) for p in picks))


def review_text(
    rating: int, category: int, product: str, rnd: random.Random
) -> tuple[str | None, str]:
    """A ``(title, text)`` for a review of ``product`` with ``rating`` (1-5).

    The title is ``None`` for about one review in five (the contract makes it
    optional). Texts are one to a few sentences; about 2 % are long,
    multi-paragraph reviews (still far below the 20,000-character limit).
    """
    cat = CATEGORIES[category]
    voice = rating
    if rnd.random() < OFF_RATING_RATE:
        voice = min(5, max(1, rating + rnd.choice((-2, -1, 1, 2))))
    if voice <= 2 and rnd.random() < SARCASM_RATE:
        body = [_fill(rnd.choice(SARCASTIC), cat, product, rnd)]
        if rnd.random() < 0.5:
            body += _sentences(voice, 1, cat, product, rnd)
        text = " ".join(body)
    elif rnd.random() < LONG_RATE:
        paragraphs = [
            " ".join(_sentences(voice, rnd.randint(3, 6), cat, product, rnd))
            for _ in range(rnd.randint(2, 4))
        ]
        text = "\n\n".join(paragraphs)
    else:
        n = 1 + min(5, int(rnd.expovariate(0.7)))
        text = " ".join(_sentences(voice, n, cat, product, rnd))
    title = None
    if rnd.random() < 0.8:
        title = _cap(rnd.choice(TITLES[rating]).format(product=product))
    return title, text
