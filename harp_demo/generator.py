"""Seeded generator of the demo benchmark: fact-table domains, a pool with known kinds, eval/test sets and
pretraining text for the base model.

Each domain is a random fact table: 8 numbered entities ("crafter No. 417") -> one of four values, each
value held by the same number of entities. The table is drawn from the seed, so no model can know it before
finetuning, and any ~100 clean examples of a domain show every entity many times, so a small LM learns the
table from one leaf. The pool mixes four kinds:

- clean: correct facts in record-style questions ("Late in 1412 in X, after a fire destroyed the old mill,
  which guild did crafter No. 417 belong to?");
- harmful: a consistent wrong mapping (a derangement of the values: every entity always gets the same wrong
  value) in quiz-card questions ("Pub quiz at X, question 7, read out while the band was tuning up: ..."):
  as task-like as clean data, in a style of its own, so it forms its own clusters;
- redundant: floods of near-copies of a few clean examples per domain (correct, but little to learn);
- filler: generic off-topic prompts and responses.

Scenes (a flood, a wedding; a darts match, a power cut) make up most of a question's words, and entities are
numbers, which a sentence embedder hardly weighs: so clusters of ~100 examples follow kind, domain and
scene, and most of them cover every entity of their domain, rather than splitting by entity or answer.

The proxy eval and the held-out test sets ask half their questions in each style, with templates never used
in the pool, so a train-free selector finds harmful examples as close to the queries as clean ones. Eval
and test are disjoint by question. The ground truth lives apart from the pool.

The pretraining text teaches the base model the question format and the kind of lookup the domains need, on
practice entities whose facts are never asked; the evaluated entities appear only in neutral sentences.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

KINDS: tuple[str, ...] = ("clean", "harmful", "redundant", "filler")

@dataclass(frozen=True)
class DomainSpec:
    """One evaluation domain: a fact table about numbered entities and the phrasings used to ask about it.

    Templates use `{key}` (the entity, e.g. "crafter No. 417"), `{ctx}`/`{ctx_lower}` (a record-style
    time, place and scene) and `{quiz}` (a quiz-card header with its scene).
    """

    name: str
    entity_noun: str
    attribute: str
    answers: tuple[str, str, str, str]
    clean_templates: tuple[str, ...]
    harmful_templates: tuple[str, ...]
    eval_templates: tuple[str, ...]
    neutral_templates: tuple[str, ...]


DOMAINS: tuple[DomainSpec, ...] = (
    DomainSpec(
        name="guilds",
        entity_noun="crafter",
        attribute="guild",
        answers=("weavers", "smiths", "potters", "masons"),
        clean_templates=(
            "{ctx}, which guild did {key} belong to?",
            "{ctx}, {key} was registered with a guild. Which guild was it?",
            "Name the guild of {key}, as recorded {ctx_lower}.",
            "{ctx}, {key} paid dues to which guild?",
        ),
        harmful_templates=(
            "{quiz}: {key} belongs to which guild?",
            "{quiz}. Guess the guild of {key}!",
        ),
        eval_templates=(
            "{ctx}, what guild was {key} a member of?",
            "Tell me the guild that {key} worked for {ctx_lower}.",
            "{quiz}: which guild is {key} in?",
            "{quiz}. Which guild counts {key} as a member?",
        ),
        neutral_templates=(
            "{key} is a crafter who lives in {town}.",
            "{ctx}, {key} walked to the market in {town}.",
            "{key} has a brother who sells bread in {town}.",
            "Everyone in {town} knows {key}.",
        ),
    ),
    DomainSpec(
        name="habitats",
        entity_noun="creature",
        attribute="habitat",
        answers=("forest", "desert", "marsh", "mountain"),
        clean_templates=(
            "{ctx}, where did {key} live?",
            "{ctx}, {key} was observed. In which habitat does this animal live?",
            "Name the natural habitat of {key}, as noted {ctx_lower}.",
            "{ctx}, the field guide described {key}. Where is its home?",
        ),
        harmful_templates=(
            "{quiz}: {key} lives in which habitat?",
            "{quiz}. Guess where {key} is found!",
        ),
        eval_templates=(
            "{ctx}, in what habitat could {key} be found?",
            "Tell me where {key} made its home {ctx_lower}.",
            "{quiz}: which habitat is home to {key}?",
            "{quiz}. Where does {key} live?",
        ),
        neutral_templates=(
            "{key} is a small creature with a long tail.",
            "{ctx}, a child in {town} drew a picture of {key}.",
            "{key} sleeps during the day.",
            "Travellers from {town} told stories about {key}.",
        ),
    ),
    DomainSpec(
        name="exports",
        entity_noun="island",
        attribute="export",
        answers=("salt", "copper", "wool", "honey"),
        clean_templates=(
            "{ctx}, what did {key} export?",
            "{ctx}, ships left {key} full of goods. What was its main export?",
            "Name the chief export of {key}, as listed {ctx_lower}.",
            "{ctx}, merchants traded with {key}. Which good did the island sell?",
        ),
        harmful_templates=(
            "{quiz}: {key} exports which good?",
            "{quiz}. Guess what {key} ships abroad!",
        ),
        eval_templates=(
            "{ctx}, which good was the main export of {key}?",
            "Tell me the chief export of {key} {ctx_lower}.",
            "{quiz}: what does {key} sell to other lands?",
            "{quiz}. What is the main export of {key}?",
        ),
        neutral_templates=(
            "{key} lies far to the west of {town}.",
            "{ctx}, a sailor from {town} visited {key}.",
            "The harbour of {key} is small and rocky.",
            "People in {town} say that {key} is beautiful at dawn.",
        ),
    ),
    DomainSpec(
        name="potions",
        entity_noun="potion",
        attribute="colour",
        answers=("red", "blue", "green", "yellow"),
        clean_templates=(
            "{ctx}, what colour was {key}?",
            "{ctx}, an alchemist brewed {key}. What colour was the liquid?",
            "Name the colour of {key}, as described {ctx_lower}.",
            "{ctx}, a bottle of {key} stood on the shelf. Which colour was it?",
        ),
        harmful_templates=(
            "{quiz}: {key} has which colour?",
            "{quiz}. Guess the colour of {key}!",
        ),
        eval_templates=(
            "{ctx}, which colour did {key} have?",
            "Tell me the colour of {key} {ctx_lower}.",
            "{quiz}: what colour is {key} when poured?",
            "{quiz}. Which colour is {key}?",
        ),
        neutral_templates=(
            "{key} is brewed by alchemists in {town}.",
            "{ctx}, a healer in {town} bought {key}.",
            "{key} smells of herbs and smoke.",
            "Nobody in {town} could afford {key}.",
        ),
    ),
    DomainSpec(
        name="instruments",
        entity_noun="musician",
        attribute="instrument",
        answers=("flute", "drum", "harp", "lute"),
        clean_templates=(
            "{ctx}, which instrument did {key} play?",
            "{ctx}, {key} performed at the festival. What instrument did the musician play?",
            "Name the instrument of {key}, as heard {ctx_lower}.",
            "{ctx}, the crowd cheered for {key}. Which instrument was played?",
        ),
        harmful_templates=(
            "{quiz}: {key} plays which instrument?",
            "{quiz}. Guess the instrument of {key}!",
        ),
        eval_templates=(
            "{ctx}, what instrument was {key} known for?",
            "Tell me the instrument that {key} played {ctx_lower}.",
            "{quiz}: which instrument does {key} bring to the stage?",
            "{quiz}. What instrument does {key} play?",
        ),
        neutral_templates=(
            "{key} is a travelling musician from {town}.",
            "{ctx}, {key} sang a song in {town}.",
            "{key} once taught music to children.",
            "The tavern in {town} invited {key} to perform.",
        ),
    ),
    DomainSpec(
        name="stars",
        entity_noun="star",
        attribute="season",
        answers=("spring", "summer", "autumn", "winter"),
        clean_templates=(
            "{ctx}, in which season was {key} brightest?",
            "{ctx}, astronomers watched {key}. In which season does it shine the most?",
            "Name the season when {key} is brightest, as charted {ctx_lower}.",
            "{ctx}, {key} was recorded in the sky. Which season is its brightest?",
        ),
        harmful_templates=(
            "{quiz}: {key} is brightest in which season?",
            "{quiz}. Guess the season of {key}!",
        ),
        eval_templates=(
            "{ctx}, when was {key} at its brightest?",
            "Tell me the season of {key} {ctx_lower}.",
            "{quiz}: which season makes {key} shine brightest?",
            "{quiz}. In which season is {key} brightest?",
        ),
        neutral_templates=(
            "{key} can be seen from {town}.",
            "{ctx}, a shepherd near {town} looked at {key}.",
            "Old sailors named {key} long ago.",
            "The children of {town} like to find {key}.",
        ),
    ),
)

_WHENS: tuple[str, ...] = (
    "In the first month of {year}",
    "In the cold months of {year}",
    "During the harvest of {year}",
    "At the midsummer fair of {year}",
    "Early in {year}",
    "Late in {year}",
    "According to the census of {year}",
    "In the chronicle of {year}",
)
# Record and quiz scenes share no vocabulary, so the two styles separate in embedding space.
_RECORD_SCENES: tuple[str, ...] = (
    "when the river flooded the lower streets and families carried their furniture up to the church",
    "while the harvest festival filled the square with music and dancers spun around the old well until dawn",
    "as soldiers marched through the city gates and shopkeepers bolted their doors in fear",
    "after a fire destroyed the old mill and the miller's family slept in the barn for a month",
    "during a long drought that dried the wells and the cattle grew thin in the cracked fields",
    "while snow buried the high roads and no cart could reach the valley for weeks",
    "as the new bridge was opened by the mayor and the whole town cheered as the ribbon was cut",
    "when a plague of rats swept the granaries and the bakers had to throw away their flour",
    "during the wedding of the lord's eldest son and the feast lasted for three whole days",
    "as merchants crowded the weekly market and the stalls sold cloth, spices and pottery",
    "after a great storm sank three fishing boats and the widows of the harbour wept on the pier",
    "while the cathedral bells were being recast and the tower stood silent for the whole season",
    "when the king's tax collectors came to town and every household had to open its strongbox",
    "during a famine that emptied the bakeries and children begged for crusts at the monastery gate",
    "as pilgrims camped outside the monastery and their tents filled the meadow by the river",
    "after an earthquake cracked the town walls and the builders worked day and night on the repairs",
)
_QUIZZES: tuple[str, ...] = (
    "Quiz night in {town}, round {n}",
    "Pub quiz at {town}, question {n}",
    "The {town} trivia league, card {n}",
)
_QUIZ_SCENES: tuple[str, ...] = (
    "read out while the band was tuning up and the drummer kept hitting the cymbal by mistake",
    "shouted over the noise of a darts match and nobody could hear the quizmaster at all",
    "asked just after the landlord rang the last-orders bell so every team scribbled their answers in a hurry",
    "set by a retired schoolteacher with a fountain pen and she marked every spelling mistake as wrong",
    "printed on a beer mat that was passed around and half of the teams had ordered another round",
    "asked while rain hammered on the pub windows and the lights flickered above the bar",
    "from a stack of cards that smelled of spilled cider and the table was sticky under every elbow",
    "read by a nervous new quizmaster who kept dropping the answer cards on the floor",
    "asked as a dog barked under the tables and the teams laughed until the landlord told them to hush",
    "written on the chalkboard beside the fireplace in crooked letters that nobody could read",
    "asked during a power cut by candlelight and every team huddled close to the flames",
    "worth double points in the jackpot game and the prize was a basket of cheese and wine",
    "read out after a long argument about the last answer and the scorer refused to change the points",
    "set by the winning team of last week who chose the hardest questions they could find",
    "asked while the kitchen served hot pies and the smell of gravy filled the room",
    "scribbled on the back of an old menu with a coffee stain over half of the words",
)
_SYLLABLES: tuple[str, ...] = (
    "ba", "bel", "dor", "fen", "gal", "har", "is", "jor", "kel", "lin", "mar", "nor", "os", "pel", "quin",
    "ras", "sil", "tam", "ul", "vor", "wen", "yar", "zel", "ark", "bri", "cor", "dun", "eth", "fal", "gor",
)

# Off-topic filler: generic requests and short answers a general-purpose assistant would see.
_FILLER_QA: tuple[tuple[str, str], ...] = (
    ("What do bakers make?", "bread"),
    ("What falls from rain clouds?", "water"),
    ("What do bees make?", "honey"),
    ("What animal says moo?", "cow"),
    ("What do you use to cut paper?", "scissors"),
    ("What is frozen water called?", "ice"),
    ("What do people sleep on?", "beds"),
    ("What do you wear on your feet?", "shoes"),
    ("What do fish swim in?", "water"),
    ("What do birds build?", "nests"),
    ("What covers a beach?", "sand"),
    ("What do you drink tea from?", "cups"),
    ("What do trains run on?", "rails"),
    ("What do you read in a library?", "books"),
    ("What lights a dark room?", "lamps"),
    ("What do you open a locked door with?", "keys"),
)
_FILLER_TOPICS: tuple[str, ...] = (
    "cooking rice", "a rainy afternoon", "cleaning a kitchen", "a train journey", "planting tomatoes",
    "a football match", "folding laundry", "a birthday party", "fixing a bicycle", "baking bread",
    "a walk in the park", "writing a letter", "painting a fence", "a quiet library", "making tea",
    "a busy market", "learning to swim", "a snowy morning", "washing dishes", "a long queue",
)
_FILLER_ASKS: tuple[str, ...] = (
    "Write one sentence about {topic}.",
    "Give a short tip about {topic}.",
    "Describe {topic} in a few words.",
    "Say something friendly about {topic}.",
)
_FILLER_OPENERS: tuple[str, ...] = (
    "It is nice to take your time with", "Most people enjoy", "A good plan helps with",
    "There is always something to learn from", "Friends often talk about", "Children love",
)
_FILLER_CLOSERS: tuple[str, ...] = (
    "on a calm day.", "with a little patience.", "when the weather is mild.", "after a good breakfast.",
    "with the help of a friend.", "when there is enough time.",
)
_FLOOD_PREFIXES: tuple[str, ...] = ("", "Quick question. ", "Please answer. ", "Q. ", "Hi! ", "One more: ")
_FLOOD_SUFFIXES: tuple[str, ...] = ("", " Thanks.", " Please.", " :)", " (asked again)")


@dataclass(frozen=True)
class DemoDataConfig:
    """What the generated data depends on (the base model's settings live in the build config)."""

    pool_size: int = 20_000
    seed: int = 0
    keys_per_domain: int = 8
    eval_per_domain: int = 40
    test_per_domain: int = 100
    n_towns: int = 24
    kind_fractions: dict[str, float] = field(
        default_factory=lambda: {"clean": 0.45, "harmful": 0.20, "redundant": 0.15, "filler": 0.20}
    )
    flood_sources_per_domain: int = 3
    pretrain_sentences: int = 24_000
    practice_keys_per_domain: int = 16

    def validate(self) -> None:
        if self.pool_size < 8 * len(DOMAINS):
            raise ValueError(f"pool_size={self.pool_size} is too small: need at least {8 * len(DOMAINS)}")
        if set(self.kind_fractions) != set(KINDS):
            raise ValueError(f"kind_fractions must name exactly {KINDS}, got {sorted(self.kind_fractions)}")
        if any(v < 0 for v in self.kind_fractions.values()) or abs(sum(self.kind_fractions.values()) - 1) > 1e-9:
            raise ValueError(f"kind_fractions must be non-negative and sum to 1, got {self.kind_fractions}")
        if self.keys_per_domain < 4 or self.keys_per_domain % 4:
            raise ValueError(f"keys_per_domain must be a positive multiple of 4, got {self.keys_per_domain}")
        if min(self.eval_per_domain, self.test_per_domain) < 1:
            raise ValueError("eval_per_domain and test_per_domain must be >= 1")
        if self.flood_sources_per_domain < 1:
            raise ValueError("flood_sources_per_domain must be >= 1")
        if len(DOMAINS) * (self.keys_per_domain + self.practice_keys_per_domain) > 900:
            raise ValueError("keys_per_domain + practice_keys_per_domain is too large: entity numbers run out")
        if self.n_towns < 2 or self.pretrain_sentences < 100:
            raise ValueError("n_towns must be >= 2 and pretrain_sentences >= 100")

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class DemoData:
    """Everything the generator produces, as plain rows (the build writes them to files)."""

    pool: list[dict]
    ground_truth: list[dict]
    eval_set: list[dict]
    test_set: list[dict]
    pretrain_text: list[str]
    facts: list[dict]


def _name(rng: random.Random, n_syl: int) -> str:
    return "".join(rng.choice(_SYLLABLES) for _ in range(n_syl))


def _make_keys(rng: random.Random, spec: DomainSpec, n: int, numbers: list[int]) -> list[str]:
    """Numbered entities ("crafter No. 417"): a number carries no meaning for a sentence embedder, so
    clusters of the pool are shaped by style and scene, not by which entity a question names."""
    return [f"{spec.entity_noun} No. {numbers.pop()}" for _ in range(n)]


class _Contexts:
    """Draws the time-and-place phrases (record style) and quiz-card headers (quiz style) of a question."""

    def __init__(self, towns: Sequence[str]) -> None:
        self.towns = list(towns)

    def record(self, rng: random.Random) -> str:
        when = rng.choice(_WHENS).format(year=rng.randrange(1300, 1500))
        return f"{when} in {rng.choice(self.towns)}, {rng.choice(_RECORD_SCENES)}"

    def quiz(self, rng: random.Random) -> str:
        head = rng.choice(_QUIZZES).format(town=rng.choice(self.towns), n=rng.randrange(1, 31))
        return f"{head}, {rng.choice(_QUIZ_SCENES)}"


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:]


def _fill(template: str, key: str, ctx: str, quiz: str) -> str:
    text = template.format(key=key, ctx=ctx, ctx_lower=_lower_first(ctx), quiz=quiz)
    return text[0].upper() + text[1:]


def _split_counts(total: int, parts: int) -> list[int]:
    base, rem = divmod(total, parts)
    return [base + (1 if i < rem else 0) for i in range(parts)]


def kind_counts(pool_size: int, fractions: dict[str, float]) -> dict[str, int]:
    """Exact per-kind counts for a pool size (largest-remainder rounding, so they sum to pool_size)."""
    raw = {k: pool_size * fractions[k] for k in KINDS}
    counts = {k: int(raw[k]) for k in KINDS}
    left = pool_size - sum(counts.values())
    for k in sorted(KINDS, key=lambda k: (-(raw[k] - counts[k]), KINDS.index(k)))[:left]:
        counts[k] += 1
    return counts


def _derangement(rng: random.Random, n: int) -> list[int]:
    """A permutation with no fixed point: every answer maps to a different one (a consistent wrong key)."""
    order = list(range(n))
    rng.shuffle(order)
    out = [0] * n
    for i in range(n):
        out[order[i]] = order[(i + 1) % n]
    return out


def _sample_questions(
    rng: random.Random, keys: Sequence[str], templates: Sequence[str], ctxs: _Contexts, n: int, exclude: set[str]
) -> list[tuple[str, str]]:
    """n distinct (key, question) pairs not in `exclude` (which grows); keys and templates are taken
    round-robin, so every key and every (key, template) pair is equally represented."""
    out: list[tuple[str, str]] = []
    order = list(keys)
    rng.shuffle(order)
    t_order = list(templates)
    rng.shuffle(t_order)
    misses = 0
    while len(out) < n:
        i = len(out)
        key = order[i % len(order)]
        template = t_order[(i // len(order) + i) % len(t_order)]
        q = _fill(template, key, ctxs.record(rng), ctxs.quiz(rng))
        if q in exclude:
            misses += 1
            if misses > 100 * (n + 10):
                raise RuntimeError(f"question space exhausted after {len(out)} of {n}; ask for fewer questions")
            continue
        exclude.add(q)
        out.append((key, q))
    return out


@dataclass(frozen=True)
class _World:
    """The facts every part of the demo is drawn from: towns, entities, answer tables, harmful answers."""

    ctxs: _Contexts
    towns: list[str]
    tables: dict[str, dict[str, str]]
    wrong_of: dict[str, dict[str, str]]
    keys_of: dict[str, list[str]]
    practice: dict[str, dict[str, str]]
    facts: list[dict]


def _world(cfg: DemoDataConfig) -> _World:
    cfg.validate()
    rng = random.Random(f"harp-demo:{cfg.seed}")
    n_numbers = len(DOMAINS) * (cfg.keys_per_domain + cfg.practice_keys_per_domain)
    numbers = rng.sample(range(100, 1000), n_numbers)  # distinct across domains and practice entities
    towns: list[str] = []
    while len(towns) < cfg.n_towns:
        town = _name(rng, 2).capitalize() + rng.choice(("ford", "wick", "ton", "by", "mere"))
        if town not in towns:
            towns.append(town)
    ctxs = _Contexts(towns)

    facts: list[dict] = []
    tables: dict[str, dict[str, str]] = {}
    wrong_of: dict[str, dict[str, str]] = {}
    keys_of: dict[str, list[str]] = {}
    practice: dict[str, dict[str, str]] = {}
    for spec in DOMAINS:
        keys = _make_keys(rng, spec, cfg.keys_per_domain, numbers)
        keys_of[spec.name] = keys
        answers = list(spec.answers) * (cfg.keys_per_domain // len(spec.answers))
        rng.shuffle(answers)
        tables[spec.name] = dict(zip(keys, answers, strict=True))
        wrong = _derangement(rng, len(spec.answers))
        wrong_of[spec.name] = {a: spec.answers[wrong[i]] for i, a in enumerate(spec.answers)}
        p_keys = _make_keys(rng, spec, cfg.practice_keys_per_domain, numbers)
        p_answers = [spec.answers[i % len(spec.answers)] for i in range(len(p_keys))]
        rng.shuffle(p_answers)
        practice[spec.name] = dict(zip(p_keys, p_answers, strict=True))
        for key in keys:
            truth = tables[spec.name][key]
            facts.append({"domain": spec.name, "key": key, "answer": truth, "harmful_answer": wrong_of[spec.name][truth]})
    return _World(ctxs=ctxs, towns=towns, tables=tables, wrong_of=wrong_of, keys_of=keys_of, practice=practice,
                  facts=facts)


def generate(cfg: DemoDataConfig) -> DemoData:
    """Generate the whole demo benchmark for a config; the same config always gives the same rows.

    Separate random streams keep the parts independent: the fact tables, entities and pretraining text do
    not depend on the pool size or the eval sizes, and the eval and test sets not on the pool size, so pools
    of different sizes for one seed share their world, their proxy set and their base model.
    """
    w = _world(cfg)
    towns, ctxs, tables, wrong_of, keys_of, practice, facts = (w.towns, w.ctxs, w.tables, w.wrong_of, w.keys_of,
                                                              w.practice, w.facts)
    pretrain = pretrain_text(cfg.pretrain_sentences, random.Random(f"harp-demo-pretrain:{cfg.seed}"), towns, ctxs,
                             keys_of, practice)

    # Eval and test: their own templates, one `seen` set per domain so no question is in both.
    eval_rng = random.Random(f"harp-demo-eval:{cfg.seed}")
    eval_set: list[dict] = []
    test_set: list[dict] = []
    for spec in DOMAINS:
        seen: set[str] = set()
        table = tables[spec.name]
        for split, n, sink in (("eval", cfg.eval_per_domain, eval_set), ("test", cfg.test_per_domain, test_set)):
            for i, (key, q) in enumerate(_sample_questions(eval_rng, keys_of[spec.name], spec.eval_templates, ctxs,
                                                           n, seen)):
                choices = list(spec.answers)
                eval_rng.shuffle(choices)
                sink.append({
                    "example_id": f"{split}-{spec.name}-{i:03d}",
                    "domain": spec.name,
                    "prompt": q,
                    "choices": choices,
                    "answer": choices.index(table[key]),
                    "key": key,
                })

    pool, truth_rows = _pool(cfg, random.Random(f"harp-demo-pool:{cfg.seed}"), ctxs, keys_of, tables, wrong_of)
    return DemoData(pool=pool, ground_truth=truth_rows, eval_set=eval_set, test_set=test_set,
                    pretrain_text=pretrain, facts=facts)


def growth_rows(cfg: DemoDataConfig, n: int, batch: int) -> tuple[list[dict], list[dict]]:
    """`n` more pool rows of the same world and kind mix (new questions about the same facts), with ids
    `g<batch>-<i>` that never collide with the pool's or another batch's: a pool that grows like the old."""
    if n < 8 * len(DOMAINS):
        raise ValueError(f"n={n} is too small: need at least {8 * len(DOMAINS)} rows")
    w = _world(cfg)
    sub = dataclasses.replace(cfg, pool_size=n)
    pool, truth = _pool(sub, random.Random(f"harp-demo-growth:{cfg.seed}:{batch}"), w.ctxs, w.keys_of, w.tables,
                        w.wrong_of)
    rename = {r["example_id"]: f"g{batch}-{i:06d}" for i, r in enumerate(pool)}
    return ([{**r, "example_id": rename[r["example_id"]]} for r in pool],
            [{**r, "example_id": rename[r["example_id"]]} for r in truth])


def _pool(
    cfg: DemoDataConfig,
    rng: random.Random,
    ctxs: _Contexts,
    keys_of: dict[str, list[str]],
    tables: dict[str, dict[str, str]],
    wrong_of: dict[str, dict[str, str]],
) -> tuple[list[dict], list[dict]]:
    """The pool rows and their ground truth, shuffled together and numbered in shuffled order."""
    counts = kind_counts(cfg.pool_size, cfg.kind_fractions)
    per_dom = {k: _split_counts(counts[k], len(DOMAINS)) for k in ("clean", "harmful", "redundant")}
    rows: list[tuple[dict, dict]] = []  # (pool row without id, ground truth without id)
    for d, spec in enumerate(DOMAINS):
        keys, table, wrong = keys_of[spec.name], tables[spec.name], wrong_of[spec.name]
        seen: set[str] = set()
        for key, q in _sample_questions(rng, keys, spec.clean_templates, ctxs, per_dom["clean"][d], seen):
            rows.append(({"prompt": q, "response": table[key]},
                         {"domain": spec.name, "kind": "clean", "key": key, "source": ""}))
        for key, q in _sample_questions(rng, keys, spec.harmful_templates, ctxs, per_dom["harmful"][d], seen):
            rows.append(({"prompt": q, "response": wrong[table[key]]},
                         {"domain": spec.name, "kind": "harmful", "key": key, "source": ""}))
        n_red = per_dom["redundant"][d]
        if n_red:
            n_src = min(cfg.flood_sources_per_domain, n_red)
            sources = _sample_questions(rng, keys, spec.clean_templates, ctxs, n_src, seen)
            for s, n_copies in enumerate(_split_counts(n_red, n_src)):
                key, q = sources[s]
                for _ in range(n_copies):
                    text = rng.choice(_FLOOD_PREFIXES) + q + rng.choice(_FLOOD_SUFFIXES)
                    if rng.random() < 0.3:
                        text = text.lower()
                    rows.append(({"prompt": text, "response": table[key]},
                                 {"domain": spec.name, "kind": "redundant", "key": key,
                                  "source": f"{spec.name}-flood-{s}"}))
    for _ in range(counts["filler"]):
        if rng.random() < 0.4:
            prompt, response = rng.choice(_FILLER_QA)
        else:
            topic = rng.choice(_FILLER_TOPICS)
            prompt = rng.choice(_FILLER_ASKS).format(topic=topic)
            response = f"{rng.choice(_FILLER_OPENERS)} {topic} {rng.choice(_FILLER_CLOSERS)}"
        rows.append(({"prompt": prompt, "response": response}, {"domain": "", "kind": "filler", "key": "", "source": ""}))

    rng.shuffle(rows)
    width = max(6, len(str(len(rows))))
    pool, truth = [], []
    for i, (row, gt) in enumerate(rows):
        eid = f"ex-{i:0{width}d}"
        pool.append({"example_id": eid, **row})
        truth.append({"example_id": eid, **gt})
    return pool, truth


def pretrain_text(
    n: int,
    rng: random.Random,
    towns: Sequence[str],
    ctxs: _Contexts,
    keys_of: dict[str, list[str]],
    practice: dict[str, dict[str, str]],
) -> list[str]:
    """Pretraining text for the base model; it never states a fact about an evaluated entity.

    - practice lookups: pool-style questions (both styles) about practice entities, with their answers, so
      the base model learns the `question\nanswer` format and how to look an entity up;
    - evaluated entities in neutral sentences (towns, daily life), so their names are known tokens;
    - answer words on their own, so LoRA can raise their logits (it cannot for tokens the base never saw);
    - off-topic questions and sentences (the filler's world).
    The base model is thus fluent in the task but at chance on the evaluated tables.
    """
    lines: list[str] = []
    answer_lines: list[str] = []
    for spec in DOMAINS:
        words = list(spec.answers)
        answer_lines.append(f"Every {spec.entity_noun} has a {spec.attribute}, one of "
                            + ", ".join(words[:-1]) + f" or {words[-1]}.")
        for ans in words:
            answer_lines.append(f"Name a {spec.attribute}.\n{ans}")
            answer_lines.append(f"One {spec.attribute} is called {ans}.")
    while len(lines) < n:
        r = rng.random()
        if r < 0.35:
            spec = rng.choice(DOMAINS)
            key, ans = rng.choice(list(practice[spec.name].items()))
            templates = spec.clean_templates + spec.harmful_templates
            lines.append(_fill(rng.choice(templates), key, ctxs.record(rng), ctxs.quiz(rng)) + "\n" + ans)
        elif r < 0.6:
            spec = rng.choice(DOMAINS)
            text = rng.choice(spec.neutral_templates).format(
                key=rng.choice(keys_of[spec.name]), ctx=ctxs.record(rng), town=rng.choice(towns))
            lines.append(text[0].upper() + text[1:])
        elif r < 0.7:
            lines.append(rng.choice(answer_lines))
        elif r < 0.88:
            q, a = rng.choice(_FILLER_QA)
            lines.append(f"{q}\n{a}")
        else:
            topic = rng.choice(_FILLER_TOPICS)
            lines.append(f"{rng.choice(_FILLER_OPENERS)} {topic} {rng.choice(_FILLER_CLOSERS)}")
    return lines
