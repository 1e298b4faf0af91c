"""Rule-based layout planner: prompt -> boxes from word lists and rules, offline and deterministic.

:class:`RuleBasedPlanner` chunks an English prompt into noun phrases (determiners, numbers, "pair of",
colours and adjectives kept in each object's prompt), reads the relation words between them (left/right
of, on, on top of, under, above, in front of, behind, next to, in, with, holding, ...), sizes each object
by its role (supports, backdrops, containers, people, tall/long/flat things) and places the boxes in a
scene tree, scaled uniformly into the unit cube so that every relation it records holds. It needs no NLP
dependency: small word lists and rules only.

It answers ``plan(prompt) -> LayoutResult`` with ``source="rules"`` and is also the fallback of the LLM
planners (``coherendream.generation.layout_llm``) when their answers fail validation. The schema,
validation and seeding it builds on live in ``coherendream.generation.layout``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import numpy as np

from coherendream.generation.layout import (
    MAX_NAME_CHARS,
    MAX_OBJECTS,
    MAX_PROMPT_CHARS,
    MAX_RELATIONS,
    RELATION_TOL,
    Layout,
    LayoutError,
    LayoutResult,
    box_overlap_fraction,
    repair_layout,
    validate_layout,
)
from coherendream.vocabulary import COLOR_WORDS, OVERLAP_OK_RELATIONS, relation_holds

__all__ = ["RuleBasedPlanner", "WholePromptPlanner"]

# ---------------------------------------------------------------------------------------------------
# Vocabulary: small word lists and rules, no NLP dependency
# ---------------------------------------------------------------------------------------------------

_DETERMINERS = frozenset("a an the his her its their my your our this that these those some another each every".split())
_NUMBERS = {
    "one": 1, "two": 2, "three": 3, "four": 4, "five": 5, "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
    "both": 2, "several": 3, "few": 3, "many": 4, "dozen": 4, "multiple": 3,
}
_AUX = frozenset("is are was were be being been am has have had does do could would should will might must".split())
_PARTICLES = frozenset(
    "to for towards toward out up down away off yet there here just still very too as while where which who "
    "than so not also then only together far back".split()
)
_VERB_BASES = (
    "sit lie lay rest stand hang lean burn gleam glisten sleep share cuddle cast cluster compete shine touch dwarf "
    "argue mingle long stroke jump emit aspire recline wait type train make kick hold read put climb repair fly "
    "capture examine beat throw reach scatter nestle forget soak await outshine wrap accompany cocoon seal smear "
    "glare drip pose place knot perch swim soar point tick drape roll sparkle abandon play look ride eat drink "
    "sing dance run walk float grow bloom carry wear chase feed pour cut stare fall lounge cool emit hover keep "
    "fill display bask glow twinkle sprout strum crawl rise spill melt gaze cook bake bounce hide peek peer nap "
    "stretch loom sprawl cover contain support tilt prop balance stay sleep guard greet brown smile breathe hug push "
    "pull build chew lick sniff dig juggle knit sew hunt"
).split()
_VERB_IRREGULAR = frozenset(
    "lies lying lay lays laid sat sits sitting stood hung held flew flown swam swimming threw thrown forgotten "
    "made read left kept fell fallen risen put cut spilt spilled grew grown worn".split()
) - {"worn"}  # "worn" is nearly always an adjective in prompts ("worn boots")
_NOUN_ING = frozenset(
    "ring king string ceiling wedding building pudding earring wing swing spring sling thing painting clothing icing "
    "frosting stuffing dumpling sapling duckling seedling railing evening morning awning bedding stocking".split()
)
_NOUN_ED = frozenset("bed shed sled seed reed weed steed flowerbed bobsled".split())
_NOUN_LY = frozenset("lily family jelly belly butterfly dragonfly holly doily assembly bully ally".split())
_HOLD_VERBS = frozenset("holding holds hold held carrying carries carry wearing wears wear".split())
_FILL_VERBS = frozenset("filled full stuffed loaded packed".split())
_HANG_VERBS = frozenset("hanging hangs hang hung dangling".split())

# Word lists for sizes and roles (singular forms).
_ABSTRACT = frozenset(
    "day night morning evening afternoon light sky rain air wind attention opposition turn toast love scent smell "
    "fragrance shadow space guard time moment distance background side middle center centre edge corner detail "
    "detailing pattern design print stripe spot dot thread note color colour weather winter summer sunlight "
    "moonlight darkness silence way heat sunshine view page".split()
)
_PRONOUNS = frozenset("it them him her they one other itself each everything something someone".split())
_PLURALIA_TANTUM = frozenset(
    "glasses spectacles scissors binoculars jeans pants trousers shorts goggles tongs pliers headphones earphones "
    "sunglasses pajamas tights overalls crossbones lens series species news chess".split()
)
# Singular nouns that look plural to the suffix rules.
_NOT_PLURAL = frozenset("thermos cosmos chaos octopus lens bus gas canvas atlas christmas iris".split())
_PAIR_NOUNS = frozenset(
    "shoe boot sneaker mitten glove sock slipper sandal welly wellington flop earring ski chopstick drumstick "
    "needle paddle heel skate".split()
)
_PERSON = frozenset(
    "man woman girl boy child kid person artist student gymnast chef footballer worker florist gardener "
    "photographer scientist drummer fisherman dancer player musician teacher doctor astronaut knight soldier "
    "snowman lady gentleman farmer cowboy pirate".split()
)
_BIG = frozenset(
    "horse whale car bus truck bicycle bike canoe boat sailboat ship piano lighthouse barn house tree balloon "
    "giraffe cow tiger lion motorcycle tractor train castle windmill fountain tent waterfall rainbow treadmill "
    "elephant dinosaur".split()
)
_TALL = frozenset(
    "bottle vase candle lamp tower flute candlestick trophy hourglass sunflower flower rose lily plant cactus "
    "umbrella thermos saxophone hydrant statue figurine doll flamingo orchid lantern glass champagne".split()
)
_LONG = frozenset(
    "pen pencil quill knife spoon tablespoon fork key bat stick cane crowbar brush paintbrush rod hose needle "
    "drumstick bow chain ribbon scarf skateboard surfboard paddle sword wand ruler screwdriver opener snake".split()
)
_FLAT = frozenset(
    "book notebook diary novel paperback photo photograph card letter envelope puzzle sudoku palette record "
    "laptop tablet smartphone phone pizza slice pancake cookie coin ticket bookmark mask".split()
)
# Flat supports: stay flat even alone and grow to hold what stands on them.
_SLAB = frozenset(
    "beach floor ground field pasture meadow lawn grass sand snow mud puddle sea ocean lake pond river water "
    "street road sidewalk platform trail path porch shore cliff peak mountain surface stage mat rug carpet "
    "tablecloth doily plate saucer tray pad map paper parchment page chessboard board blanket quilt towel "
    "napkin runway".split()
)
# Places: a floor slab when something is in/at them, an ordinary box otherwise ("a red barn").
_SCENE = frozenset(
    "room bedroom kitchen hall foyer shop store zoo airport barn playroom landscape garden park jungle forest "
    "city classroom studio office station library".split()
)
_FURNITURE = frozenset(
    "table desk counter countertop bench shelf bed couch sofa chair stool windowsill sill dresser cabinet "
    "nightstand bale saddle chest mantel bookshelf cupboard branch log rock stump".split()
)
_BACKDROP = frozenset("wall fence door gate window mirror canvas curtain chalkboard blackboard whiteboard screen".split())
_WALL_LIKE = frozenset("wall mirror window canvas curtain chalkboard blackboard whiteboard screen".split())
_HANGER = frozenset("line clothesline hanger rack hook peg wire".split())
_CONTAINER = frozenset(
    "vase pot bowl cup mug teacup jar box shoebox cage bathtub tub basket bag frame bucket drawer nest tank "
    "aquarium bottle can case briefcase suitcase sink pan kettle teapot pocket maker jug pitcher crate barrel bin "
    "holder glass".split()
)
_SMALL_WORDS = frozenset("small tiny little mini miniature petite".split())
_LARGE_WORDS = frozenset("large big huge giant enormous tall massive".split())
# Physical size rank: a person cannot sit "on" a laptop; other kinds rank 1, supports are handled apart.
_RANK = {"person": 2, "big": 2}

_ADJECTIVES = COLOR_WORDS | _SMALL_WORDS | _LARGE_WORDS | frozenset(
    "open flat old new single empty full half whole bright dark pale shiny warm cold hot cool soft hard wet dry "
    "fresh ripe sleek glossy smooth rough young ancient antique vintage rustic elegant delicate fluffy fuzzy plush "
    "rusty dusty sturdy thick thin long short round square wooden metal plastic leather ceramic colorful colourful "
    "beautiful bright vibrant classic modern simple plain shimmering sparkling intricate ornate worn "
    # descriptive words common in free-form prompts; unlisted, one before an -ing word reads as a
    # noun doing something ("a cozy reading nook" would box "cozy" the way "a robot playing guitar"
    # boxes the robot)
    "cozy cosy sleepy happy grumpy angry lazy busy messy tidy furry hairy muddy sandy snowy sunny rainy stormy "
    "windy spooky creepy funny silly curly chubby cute adorable cheerful playful peaceful quiet lonely majestic "
    "magical futuristic fancy tasty juicy crispy creamy spicy sweet salty golden silver wooly woolly "
    "fierce gentle proud brave friendly shabby cluttered neat".split()
)
# Adjective endings that nouns of physical things almost never have ("a luxurious sleeping bag").
_ADJECTIVE_SUFFIXES = ("ous", "less")


def _singular(word: str) -> str:
    if word in _PLURALIA_TANTUM or word in _NOT_PLURAL or len(word) <= 3:
        return word
    if word.endswith("ies"):
        return word[:-3] + "y"
    if word.endswith("ves") and word[:-3] + "fe" in {"knife", "life", "wife"}:
        return word[:-3] + "fe"
    if word.endswith("ves") and word[:-3] + "f" in {"leaf", "shelf", "wolf", "loaf", "scarf", "half", "calf", "thief", "elf"}:
        return word[:-3] + "f"
    if word.endswith(("ches", "shes", "sses", "xes", "zes", "oes")) and not word.endswith(("shoes", "canoes")):
        return word[:-2]
    if word.endswith("s") and not word.endswith(("ss", "us", "is", "as")):
        return word[:-1]
    return word


def _is_plural(word: str) -> bool:
    return "'" not in word and word not in _PLURALIA_TANTUM and _singular(word) != word


def _verb_forms() -> frozenset[str]:
    forms = set(_VERB_IRREGULAR)
    for b in _VERB_BASES:
        stem_e = b[:-1] if b.endswith("e") else b
        double = b + b[-1] if re.fullmatch(r".*[^aeiou][aeiou][bdgmnpt]", b) else b
        ys = b[:-1] + "ie" if b.endswith("y") and b[-2] not in "aeiou" else b
        forms.update({b, b + "s", b + "es", ys + "s", ys + "d", stem_e + "ing", stem_e + "ed", double + "ing", double + "ed", b + "ed", b + "d"})
    return frozenset(forms)


_VERB_FORMS = _verb_forms()

# Relation phrases, longest first; each maps to a raw key resolved in context (_canonical).
_REL_PHRASES: list[tuple[tuple[str, ...], str]] = sorted(
    [
        (("to", "the", "left", "of"), "left"), (("on", "the", "left", "of"), "left"), (("left", "of"), "left"),
        (("to", "the", "right", "of"), "right"), (("on", "the", "right", "of"), "right"), (("right", "of"), "right"),
        (("on", "top", "of"), "top"), (("on", "the", "top", "of"), "top"), (("atop",), "top"), (("on",), "on"),
        (("onto",), "on"), (("upon",), "on"), (("across",), "on"),
        (("in", "front", "of"), "front"), (("in", "back", "of"), "behind"), (("behind",), "behind"),
        (("next", "to"), "next"), (("beside",), "next"), (("besides",), "next"), (("alongside",), "next"),
        (("near",), "next"), (("nearby",), "next"), (("close", "to"), "next"), (("by",), "next"),
        (("against",), "against"), (("around",), "next"), (("between",), "next"), (("among",), "next"),
        (("at",), "at"), (("from",), "from"), (("along",), "next"),
        (("under",), "under"), (("underneath",), "under"), (("beneath",), "under"), (("below",), "under"),
        (("above",), "above"), (("over",), "over"),
        (("in",), "in"), (("inside",), "in"), (("within",), "in"), (("into",), "in"), (("inside", "of"), "in"),
        (("with",), "with"),
    ],
    key=lambda p: -len(p[0]),
)
_SKIP_PHRASES = [("side", "by", "side"), ("each", "other"), ("one", "another")]


@dataclass
class _Phrase:
    """A noun phrase: its words, the index of its head word, and a count."""

    words: list[str] = field(default_factory=list)
    det: bool = False
    count: int | None = None
    pair: bool = False
    of_head: int | None = None  # head word index of the "X" in "X of Y" when X carries the meaning

    def head_index(self) -> int | None:
        if not self.words:
            return None
        if self.of_head is not None:
            return self.of_head
        candidates = [
            i for i, w in enumerate(self.words)
            if w not in _ADJECTIVES and not _is_modifier_form(w) and w not in _NON_HEADS
        ]
        return candidates[-1] if candidates else len(self.words) - 1


_NON_HEADS = frozenset({"and", "of", "a", "an", "the"})


def _is_modifier_form(w: str) -> bool:
    """-ly, -ing, -ed words (and known verb forms) are modifiers unless listed as nouns."""
    if w in _NOUN_ING or w in _NOUN_ED or w in _NOUN_LY:
        return False
    if len(w) > 4 and (w.endswith("ly") or w.endswith("ing") or w.endswith("ed")):
        return True
    if len(w) > 5 and w.endswith(_ADJECTIVE_SUFFIXES):
        return True
    return "-" in w and w.split("-")[-1] in {"eaten", "bound", "worn", "out", "in", "up", "filled", "colored", "coloured", "shaped", "handed", "burnt"}


def noun_and_attributes(phrase: str, head: str) -> tuple[str, list[str]]:
    """An object phrase's name and attributes as this planner reads them.

    ``head`` is the object's head noun (a layout object's name without its index). The words right
    before it that are nouns or -ing forms belong to the name ("wine bottle", "sewing box"); the
    adjectives, colours and participles before those are attributes; adverbs ("softly worn"),
    articles, numbers and possessives are neither. ``("a red wine bottle", "bottle")`` gives
    ``("wine bottle", ["red"])``.
    """
    skip = _DETERMINERS | set(_NUMBERS) | {"of", "and", "with"}
    words = [w for w in re.findall(r"[a-z]+", phrase.lower()) if w not in skip]
    at = max((k for k, w in enumerate(words) if w == head or _singular(w) == head), default=len(words))
    compound: list[str] = []
    attributes: list[str] = []
    for w in reversed(words[:at]):
        if w.endswith("ly"):
            continue  # an adverb qualifies the next word, not the object
        if not attributes and w not in _ADJECTIVES and (not _is_modifier_form(w) or w.endswith("ing")):
            compound.insert(0, w)
        else:
            attributes.insert(0, w)
    return " ".join([*compound, head]), attributes


@dataclass
class _Group:
    """A planned group of identical objects ("two red cubes")."""

    head: str
    name: str
    prompt: str
    count: int
    kind: str
    scale: float
    order: int


@dataclass
class _Rel:
    subject: int
    key: str
    object: int


def _tokenise(prompt: str) -> list[str]:
    text = prompt.lower().replace("’", "'").replace("&", " and ")
    text = re.sub(r"[^a-z0-9'\-\s]", " ", text)
    words = []
    for w in text.split():
        w = w.strip("'-")
        if w:
            words.append(w)
    return words


def _kind(head: str, words: list[str]) -> str:
    """Size/role class of a phrase from its head word (and a two-word compound)."""
    pair = " ".join(words[-2:]) if len(words) >= 2 else head
    compounds = {
        "power line": "hanger", "coat rack": "hanger", "dance floor": "slab", "lily pad": "slab", "hay bale": "furniture",
        "front door": "backdrop", "teddy bear": "default", "tree branch": "furniture", "music sheet": "slab",
        "sheet music": "slab", "balance beam": "long", "hot dog": "default", "air balloon": "big",
        "watering can": "default", "soda can": "default", "wine glass": "tall", "wine glasses": "tall",
        "bedside table": "furniture", "jewelry box": "container", "sewing box": "container", "gym bag": "container",
        "popcorn maker": "container", "ballet shoes": "default", "teddy bears": "default",
    }
    if pair in compounds:
        return compounds[pair]
    for kind, words_set in (
        ("person", _PERSON), ("backdrop", _BACKDROP), ("hanger", _HANGER), ("furniture", _FURNITURE),
        ("slab", _SLAB), ("big", _BIG), ("container", _CONTAINER), ("tall", _TALL), ("long", _LONG), ("flat", _FLAT),
    ):
        if head in words_set:
            return kind
    return "default"


# Base box (w, h, d) in loose units where an ordinary object is 1 x 1 x 1.
_BASE_DIMS: dict[str, tuple[float, float, float]] = {
    "default": (1.0, 1.0, 1.0), "container": (1.0, 1.0, 1.0), "tall": (0.6, 1.4, 0.6), "long": (1.4, 0.3, 0.4),
    "flat": (1.0, 0.25, 0.8), "person": (0.8, 2.0, 0.6), "big": (2.0, 1.5, 1.2), "slab": (2.0, 0.15, 2.0),
    "furniture": (1.8, 1.0, 1.2), "backdrop": (2.0, 2.0, 0.15), "hanger": (2.0, 0.1, 0.1), "scene": (2.5, 0.15, 2.5),
}
_SUPPORT_KINDS = frozenset({"slab", "furniture", "backdrop", "hanger", "scene"})


# ---------------------------------------------------------------------------------------------------
# Planner
# ---------------------------------------------------------------------------------------------------

class WholePromptPlanner:
    """No layout: one box in the middle of the unit cube, whose prompt is the whole prompt.

    The ablation of layout initialisation: the Gaussians start as one blob, as in text-to-3D
    without a layout, and the objects, their colours and their relations come from the guidance.
    """

    def __init__(self, size: tuple[float, float, float] = (0.8, 0.6, 0.8)) -> None:
        self.size = size

    def plan(self, prompt: str) -> LayoutResult:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        obj = {"name": "scene", "prompt": prompt.strip()[:MAX_PROMPT_CHARS], "center": [0.0, 0.0, 0.0], "size": list(self.size)}
        return LayoutResult(layout=Layout.model_validate({"objects": [obj], "relations": []}), source="none")


class RuleBasedPlanner:
    """Offline, deterministic layout planner from relation words and counts.

    It chunks the prompt into noun phrases (determiners, numbers, "pair of", colours and adjectives
    kept in each object's prompt), reads relation words between them (left/right of, on, on top of,
    under, above, in front of, behind, next to, beside, near, in, inside, with, holding, ...) and
    places boxes: supports (tables, beaches, floors) become large flat boxes with their objects on
    top, walls and fences become thin backdrops with objects in front, "in" a container sinks an
    object into it, "with"/"holding" attaches a smaller box to the front, left/right/next to go side
    by side along x and in front/behind along z. Scenes are built in loose units and scaled uniformly
    into the unit cube, which keeps every relation true.
    """

    def __init__(self, margin: float = 0.05, max_count: int = 4, max_objects: int = MAX_OBJECTS) -> None:
        if not 0.0 <= margin < 0.4:
            raise ValueError(f"margin must be in [0, 0.4), got {margin}")
        self.margin = margin
        self.max_count = max_count
        self.max_objects = min(max_objects, MAX_OBJECTS)

    def plan(self, prompt: str) -> LayoutResult:
        return LayoutResult(layout=self.plan_layout(prompt), source="rules")

    def plan_layout(self, prompt: str) -> Layout:
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError("prompt must be a non-empty string")
        prompt = prompt[:2000]  # planning only needs the start of an absurdly long prompt
        groups, rels = self._parse(prompt)
        if not groups:  # nothing recognisable: one box for the whole prompt
            groups = [_Group("object", "object", prompt.strip()[:MAX_PROMPT_CHARS], 1, "default", 1.0, 0)]
            rels = []
        self._limit_counts(groups)
        rels = [r for r in rels if r.subject < len(groups) and r.object < len(groups)]  # none to a dropped group
        data = self._place(groups, rels)
        try:
            return validate_layout(data)
        except LayoutError:
            pass
        try:  # nested attachments can overlap a little more than allowed; shrinking fixes that
            return repair_layout(data)[0]
        except LayoutError:
            # A plain row of the objects is always valid, so the planner never fails.
            return validate_layout(self._place(groups, []))

    # -- parsing ---------------------------------------------------------------------------------
    def _parse(self, prompt: str) -> tuple[list[_Group], list[_Rel]]:
        words = _tokenise(prompt)
        elements = self._chunk(words)
        groups: list[_Group] = []
        rels: list[_Rel] = []
        last: list[int] = []  # the most recent (coordinated) subject group
        pending: tuple[str, str | None] | None = None
        coord = False
        last_verb: str | None = None
        for el in elements:
            tag = el[0]
            if tag == "verb":
                last_verb = el[1]
                coord = False
            elif tag == "rel":
                pending = (el[1], last_verb if el[2] else None)
            elif tag == "and":
                coord = True
            elif tag == "np":
                g = self._group(el[1], len(groups))
                if g is None:  # abstract ("a rainy day"), pronoun or bare colour: no box
                    pending = None
                    continue
                groups.append(g)
                idx = len(groups) - 1
                if pending is not None and last:
                    key, verb = pending
                    new = [r for s in last for r in self._canonical(groups, s, key, idx, verb)]
                elif coord and last:
                    new = [_Rel(last[-1], "next_to", idx)]
                elif last:
                    key = "with" if last_verb in _HOLD_VERBS else "on" if last_verb in {"riding", "rides"} else "next"
                    new = self._canonical(groups, last[0], key, idx, None)
                else:
                    new = []
                rels.extend(new)
                if coord and last and pending is None:
                    last = last + [idx]
                elif not (new and all(r.key in ("with", "inside") and r.subject == idx for r in new)):
                    # "X with Y on Z", "X filled with Y on Z": what follows an attachment or a
                    # content is said of its owner or container X
                    last = [idx]
                pending, coord, last_verb = None, False, None
        return groups, rels

    def _chunk(self, words: list[str]) -> list[tuple]:
        """Elements: ("np", _Phrase), ("rel", key, after_verb), ("verb", w), ("and",)."""
        out: list[tuple] = []
        np_: _Phrase | None = None
        of_merge = False
        prev_aux = False
        after_verb = False
        i, n = 0, len(words)

        def close() -> None:
            nonlocal np_, of_merge
            if np_ is not None and np_.words:
                out.append(("np", np_))
            np_, of_merge = None, False

        def boundary_at(k: int) -> bool:
            if k >= n:
                return True
            w = words[k]
            return (
                w in _DETERMINERS or w in _NUMBERS or w in _PARTICLES or w in _AUX or w == "and"
                or w in COLOR_WORDS or self._rel_at(words, k) is not None
                or (w.endswith("ly") and w not in _NOUN_LY)
            )

        while i < n:
            skip = next((len(p) for p in _SKIP_PHRASES if tuple(words[i:i + len(p)]) == p), 0)
            if skip:
                i += skip
                continue
            w = words[i]
            has_content = np_ is not None and bool(np_.words)
            # "a pair of" / "a couple of": a count, not a relation or an "X of Y"
            if w in {"pair", "couple"} and i + 1 < n and words[i + 1] == "of" and not has_content:
                np_ = np_ or _Phrase()
                np_.count, np_.pair = 2, w == "pair"
                i += 2
                continue
            if w in _FILL_VERBS and i + 1 < n and words[i + 1] == "of" and has_content:
                # "a basket full of apples" says what "filled with apples" says
                close()
                out.append(("verb", w))
                out.append(("rel", "with", True))
                after_verb = True
                i += 2
                continue
            if w == "of" and has_content and self._rel_at(words, i) is None:
                of_merge = True
                head = np_.head_index()
                # "the light of the moon": the meaning is in Y; "a stack of records": in X
                np_.of_head = None if _singular(np_.words[head]) in _ABSTRACT else head
                if np_.of_head is None:
                    np_.words = []  # drop the abstract X entirely
                else:
                    np_.words.append("of")  # kept in the prompt, never the head
                i += 1
                continue
            rel = self._rel_at(words, i)
            if rel is not None:
                key, length = rel
                close()
                out.append(("rel", key, after_verb))
                i += length
                prev_aux = False
                continue
            if w in _AUX:
                close()
                out.append(("verb", w))
                prev_aux, after_verb = True, True
                i += 1
                continue
            has_noun = has_content and any(
                x not in _ADJECTIVES and not _is_modifier_form(x) and x not in _NON_HEADS for x in np_.words
            )
            # A verb after a noun ends the phrase: a listed verb form or an -ing/-ed word followed by a
            # phrase boundary ("a kite flying in"), or a listed -ing form even before a bare noun
            # ("a woman putting lipstick"); "a glowing lantern" and "a closed, wrapped gift" stay whole.
            finite = w in _VERB_FORMS and not w.endswith(("ing", "ed"))  # "lies", "stands", "rest"
            # after a person any -ing word is what they do ("a chef chopping vegetables"), where
            # after a thing it may name a kind ("a cat scratching post")
            person_doing = has_noun and w.endswith("ing") and _is_modifier_form(w) and _singular(np_.words[-1]) in _PERSON
            is_verbish = (w in _VERB_FORMS or (_is_modifier_form(w) and not w.endswith("ly") and "-" not in w)) and (
                boundary_at(i + 1) or (w in _VERB_FORMS and (finite or w.endswith("ing")) and has_noun) or person_doing
            )
            if (prev_aux and (is_verbish or _is_modifier_form(w) or boundary_at(i + 1))) or (has_noun and is_verbish and not of_merge):
                close()
                out.append(("verb", w))
                prev_aux, after_verb = False, True
                i += 1
                continue
            if has_content and of_merge and is_verbish and w in _VERB_FORMS:
                close()
                out.append(("verb", w))
                prev_aux, after_verb = False, True
                i += 1
                continue
            prev_aux = False
            if w in _PARTICLES or w in {"it", "them", "they", "itself"}:
                close()
                i += 1
                continue
            if w.endswith("ly") and w not in _NOUN_LY and len(w) >= 4 and not (np_ is not None and not np_.words):
                if has_content or after_verb or np_ is None:
                    i += 1  # adverb between phrases ("lays elegantly on")
                    continue
            if w == "and":
                prev_w = words[i - 1] if i else ""
                next_w = words[i + 1] if i + 1 < n else ""
                if has_content and prev_w in COLOR_WORDS and next_w in COLOR_WORDS:
                    np_.words.append("and")  # "red and white lighthouse"
                else:
                    close()
                    out.append(("and",))
                i += 1
                continue
            if w in _DETERMINERS or w in _NUMBERS:
                if of_merge and np_ is not None:
                    if np_.words and w in {"a", "an", "the"}:
                        np_.words.append(w)  # "a map of a city": kept in the prompt
                    i += 1
                    continue
                if has_content:
                    close()
                np_ = np_ or _Phrase()
                np_.det = True
                if w in _NUMBERS and np_.count is None:
                    np_.count = _NUMBERS[w]
                i += 1
                after_verb = False
                continue
            if np_ is None:
                np_ = _Phrase()
            np_.words.append(w)
            after_verb = False
            i += 1
        close()
        return out

    @staticmethod
    def _rel_at(words: list[str], i: int) -> tuple[str, int] | None:
        for phrase, key in _REL_PHRASES:
            if tuple(words[i:i + len(phrase)]) == phrase:
                return key, len(phrase)
        return None

    def _group(self, ph: _Phrase, order: int) -> _Group | None:
        words = [w for w in ph.words if w != "and"] if ph.words else []
        if not words:
            return None
        head_i = ph.head_index()
        head = ph.words[head_i]
        sing = _singular(head)
        if head in _PLURALIA_TANTUM and ph.count is not None and not ph.pair and head.endswith("sses"):
            sing = head[:-2]  # "two empty glasses": drinking glasses, not spectacles
        if sing in _ABSTRACT or head in _PRONOUNS or head in _ABSTRACT:
            return None
        if all(w in _ADJECTIVES or w == "and" or _is_modifier_form(w) or w in _VERB_FORMS for w in ph.words):
            # no thing: only colours/adjectives ("the other white"), a stray participle ("Sandwiched
            # ...", "yet to be completed") or both ("a softly worn out ...")
            return None
        if ph.count is not None:
            count = ph.count
            if ph.pair and head in _PLURALIA_TANTUM:
                count = 1  # "a pair of glasses" is one object
        elif _is_plural(head) and ph.of_head is None:
            count = 2 if sing in _PAIR_NOUNS else 3
        elif _is_plural(head) and ph.of_head is not None:
            count = 1  # "a stack of records": one stack
        else:
            count = 1
        count = max(1, min(count, self.max_count))
        kind = _kind(sing, ph.words[: head_i] + [sing])
        if sing in _SCENE:
            kind = "scene"
        scale = 1.0
        for w in ph.words:
            if w in _SMALL_WORDS:
                scale *= 0.6
            elif w in _LARGE_WORDS:
                scale *= 1.4
        mods, tail = ph.words[:head_i], ph.words[head_i + 1:]
        if count == 1:
            text = " ".join(ph.words)
            if ph.pair:
                text = "pair of " + text
            article = "an" if text[:1] in "aeiou" else "a"
            prompt = f"{article} {text}"
        else:
            text = " ".join(mods + [sing] + tail)
            article = "an" if text[:1] in "aeiou" else "a"
            prompt = f"{article} {text}"
        # Name: the head, with the noun before it for ordinary things ("pocket watch", "teddy bear").
        name = sing
        prev = ph.words[head_i - 1] if head_i > 0 else None
        if prev and _kind(sing, [sing]) == "default" and prev not in _ADJECTIVES and not _is_modifier_form(prev) and prev not in _NON_HEADS:
            name = f"{prev} {sing}"
        return _Group(head=sing, name=name[:MAX_NAME_CHARS - 4], prompt=prompt[:MAX_PROMPT_CHARS], count=count, kind=kind, scale=scale, order=order)

    @staticmethod
    def _canonical(groups: list[_Group], s: int, key: str, o: int, verb: str | None) -> list[_Rel]:
        """Resolve a raw relation word between groups ``s`` and ``o`` using what the objects are."""
        sk, ok = groups[s].kind, groups[o].kind
        o_support = ok in _SUPPORT_KINDS
        s_rank = _RANK.get(sk, 1)  # a mat or a plate as the subject is an ordinary-sized thing
        o_rank = _RANK.get(ok, 1) if not o_support else 3
        if key == "with":
            if verb in _FILL_VERBS:
                return [_Rel(o, "inside", s)]  # "a vase filled with lilies": the lilies are in the vase
            if verb is not None:
                return [_Rel(s, "next_to", o)]  # "argues with", "trains with": side by side
            if o_rank > s_rank or ok in _SUPPORT_KINDS:
                return [_Rel(s, "next_to", o)]  # the "attachment" is bigger than its owner
            return [_Rel(o, "with", s)]  # stored as: the part is attached to its owner
        if key in {"on", "top", "over"} and ok == "backdrop":
            return [_Rel(s, "in_front_of", o)]  # "a clock on a wall", "a painting on canvas"
        if key in {"on", "top"} and ok == "hanger":
            return [_Rel(o, "above", s)]  # "jeans on a clothesline": the line is above them
        if key == "over":
            return [_Rel(s, "on_top_of" if o_support else "above", o)]
        if key in {"on", "top"}:
            if o_support or s_rank <= o_rank:
                return [_Rel(s, "on_top_of", o)]
            return [_Rel(s, "next_to", o)]  # "a student typing on his laptop"
        if key == "in":
            if ok in {"slab", "scene", "furniture"}:
                return [_Rel(s, "on_top_of", o)]  # "in a field", "in the kitchen"
            if ok == "container" and s_rank <= 1:
                return [_Rel(s, "inside", o)]
            if ok == "backdrop":
                return [_Rel(s, "in_front_of", o)]
            return [_Rel(s, "next_to", o)]
        if key in {"at", "against"}:
            if ok == "backdrop":
                return [_Rel(s, "in_front_of", o)]
            if ok in {"scene", "slab"} and key == "at":
                return [_Rel(s, "on_top_of", o)]
            return [_Rel(s, "next_to", o)]
        if key == "from":
            if verb in _HANG_VERBS:
                return [_Rel(o, "above", s)]
            return [_Rel(s, "next_to", o)]
        if key == "under":
            return [_Rel(o, "above", s)]
        simple = {"left": "left_of", "right": "right_of", "front": "in_front_of", "behind": "behind", "next": "next_to", "above": "above"}
        return [_Rel(s, simple.get(key, "next_to"), o)]

    def _limit_counts(self, groups: list[_Group]) -> None:
        del groups[self.max_objects:]
        while sum(g.count for g in groups) > self.max_objects:
            biggest = max(groups, key=lambda g: g.count)
            biggest.count -= 1

    # -- placement ---------------------------------------------------------------------------------
    def _place(self, groups: list[_Group], rels: list[_Rel]) -> dict:
        boxes, realised = _SceneTree(groups, rels).solve()
        return self._normalise(groups, boxes, realised)

    def _normalise(self, groups: list[_Group], boxes: list[tuple[int, np.ndarray, np.ndarray]], rels: list[tuple[int, str, int]]) -> dict:
        """Scale the loose-unit scene uniformly into the cube and keep the relations the boxes show."""
        lo = np.min([b[1] - b[2] / 2 for b in boxes], axis=0)
        hi = np.max([b[1] + b[2] / 2 for b in boxes], axis=0)
        scale = (1.0 - 2 * self.margin) / float(np.max(hi - lo))
        mid = (lo + hi) / 2
        objects = []
        first_of: dict[int, list[int]] = {}
        names_seen: dict[str, int] = {}
        for gi, c, s in boxes:
            g = groups[gi]
            first_of.setdefault(gi, []).append(len(objects))
            name = g.name if g.count == 1 else f"{g.name} {len(first_of[gi])}"
            names_seen[name] = names_seen.get(name, 0) + 1
            if names_seen[name] > 1:
                name = f"{name} ({names_seen[name]})"
            objects.append({
                "name": name,
                "prompt": g.prompt,
                "center": [round(float(x), 5) for x in (c - mid) * scale],
                "size": [round(float(x), 5) for x in s * scale],
            })
        draft = validate_layout({"objects": objects, "relations": []}, check_geometry=False)
        relations, seen = [], set()
        for s, key, o in rels:
            for a in first_of.get(s, []):
                for b in first_of.get(o, []):
                    oa, ob = draft.objects[a], draft.objects[b]
                    # Record only what the boxes show, in the reading the ground-truth checker uses
                    # (coherendream.vocabulary); a declared containment/attachment is kept whenever
                    # the boxes meet, since it is what licenses their overlap.
                    boxes = (oa.lo, oa.hi, ob.lo, ob.hi)
                    meets = box_overlap_fraction(oa, ob) > 0 or relation_holds("with", *boxes, RELATION_TOL)
                    if relation_holds(key, *boxes, RELATION_TOL) or (key in OVERLAP_OK_RELATIONS and meets):
                        if (a, key, b) not in seen and len(relations) < MAX_RELATIONS:
                            seen.add((a, key, b))
                            relations.append({"subject": a, "relation": key, "object": b})
        return {"objects": objects, "relations": relations}


class _SceneTree:
    """Places groups in loose units: a support tree (on / in / with / above / in front of a backdrop)
    with side-by-side rows and front-to-back columns among siblings."""

    GAP = 0.25

    def __init__(self, groups: list[_Group], rels: list[_Rel]) -> None:
        self.groups = groups
        self.n = len(groups)
        self.parent: list[int | None] = [None] * self.n
        self.mode: list[str | None] = [None] * self.n
        self.lateral: list[_Rel] = []
        self.realised: list[tuple[int, str, int]] = []
        mode_of = {"on_top_of": "top", "inside": "inside", "with": "with", "above": "above"}
        for r in rels:
            if r.subject == r.object:
                continue
            if r.key in mode_of or (r.key == "in_front_of" and groups[r.object].kind == "backdrop"):
                mode = mode_of.get(r.key, "front")
                child, par = r.subject, r.object
                if self.parent[child] is None and not self._descends(par, child) and self._fits(child, par, mode):
                    self.parent[child], self.mode[child] = par, mode
                    self.realised.append((child, r.key, par))
                else:
                    self.lateral.append(_Rel(r.subject, "next_to", r.object))
            else:
                self.lateral.append(r)
        # What sits in a container or is attached to an owner, sits there with all it carries: say so,
        # so that the overlap this implies is declared (kept only where the boxes actually meet).
        for k in range(self.n):
            if self.mode[k] in {"inside", "with"}:
                key = "inside" if self.mode[k] == "inside" else "with"
                for d in range(self.n):
                    if d != k and self._descends(d, k):
                        self.realised.append((d, key, self.parent[k]))
        # A place that holds something ("in the kitchen") holds everything else that stands free.
        for k, g in enumerate(groups):
            if g.kind in {"scene", "slab"} and any(p == k for p in self.parent) and self.parent[k] is None:
                for j in range(self.n):
                    if j != k and self.parent[j] is None and groups[j].kind not in {"scene", "slab", "backdrop"} and not self._descends(k, j):
                        self.parent[j], self.mode[j] = k, "top"
                        self.realised.append((j, "on_top_of", k))
                break

    def _fits(self, child: int, par: int, mode: str) -> bool:
        # A group of several containers cannot each hold the same child; stack on the row instead.
        return not (mode in {"inside", "with"} and self.groups[par].count > 1)

    def _descends(self, node: int, ancestor: int) -> bool:
        seen = 0
        while node is not None and seen <= self.n:
            if node == ancestor:
                return True
            node = self.parent[node]
            seen += 1
        return False

    def _children(self, node: int | None, mode: str | None = None) -> list[int]:
        return [k for k in range(self.n) if self.parent[k] == node and (mode is None or self.mode[k] == mode)]

    def _unit_dims(self, k: int, has_children: bool) -> tuple[np.ndarray, float]:
        g = self.groups[k]
        kind = g.kind
        if kind == "scene" and not has_children:
            kind = "big" if g.head in _BIG else "default"
        dims = np.array(_BASE_DIMS[kind]) * g.scale
        gap = 0.15 * dims[0]
        return dims, gap

    def _subtree(self, k: int) -> list[tuple[int, np.ndarray, np.ndarray]]:
        """Boxes (group, centre, size) of ``k``'s subtree, with ``k``'s unit bottom-centre at the origin."""
        children = self._children(k)
        dims, gap = self._unit_dims(k, bool(children))
        kind = self.groups[k].kind
        count = self.groups[k].count
        top = self._children(k, "top")
        front = self._children(k, "front")
        inside = self._children(k, "inside")
        withs = self._children(k, "with")
        above = self._children(k, "above")
        placed: list[tuple[int, np.ndarray, np.ndarray]] = []
        support = kind in _SUPPORT_KINDS

        top_boxes, top_ext = self._arrange(top)
        if support and top:
            # a table or a beach grows to hold what is on it
            unit_w = count * dims[0] + (count - 1) * gap
            need_w = top_ext[0] + 0.3
            if need_w > unit_w:
                dims[0] = (need_w - (count - 1) * gap) / count
            dims[2] = max(dims[2], top_ext[2] + 0.3)
        front_boxes, front_ext = self._arrange(front, along_x_only=True)
        if front:
            unit_w = count * dims[0] + (count - 1) * gap
            if front_ext[0] + 0.3 > unit_w:
                dims[0] = (front_ext[0] + 0.3 - (count - 1) * gap) / count
            dims[1] = max(dims[1], 1.6 * front_ext[1])
        unit_w = count * dims[0] + (count - 1) * gap
        xs = [-unit_w / 2 + dims[0] / 2 + i * (dims[0] + gap) for i in range(count)]
        for x in xs:
            placed.append((k, np.array([x, dims[1] / 2, 0.0]), dims.copy()))
        top_y = dims[1]
        for gi, c, s in top_boxes:
            placed.append((gi, c + np.array([0.0, top_y, 0.0]), s))
        if front:
            hang = self.groups[k].head in _WALL_LIKE
            y0 = max(0.0, (dims[1] - front_ext[1]) / 2) if hang else 0.0
            z0 = dims[2] / 2 + front_ext[2] / 2
            for gi, c, s in front_boxes:
                placed.append((gi, c + np.array([0.0, y0, z0]), s))
        if inside:
            boxes, ext = self._arrange(inside, along_x_only=True)
            # the content fits within 75% of the container's footprint and sits in its upper part
            sc = min(1.0, 0.75 * unit_w / ext[0], 0.75 * dims[2] / ext[2])
            for gi, c, s in boxes:
                placed.append((gi, c * sc + np.array([0.0, 0.3 * dims[1], 0.0]), s * sc))
        if withs:
            slot = unit_w / len(withs)
            for j, w in enumerate(withs):
                sub = self._subtree(w)
                lo, hi = _extent(sub)
                ext = hi - lo
                sc = min(1.0, 0.45 * dims[0] / ext[0], 0.45 * dims[1] / ext[1], 0.45 * dims[2] / ext[2], 0.8 * slot / ext[0])
                cx = -unit_w / 2 + slot * (j + 0.5)
                # the part straddles the owner's front face, centred at about two thirds of its height
                target_lo = np.array([cx - ext[0] * sc / 2, 0.62 * dims[1] - ext[1] * sc / 2, dims[2] / 2 - ext[2] * sc / 2])
                offset = target_lo - lo * sc
                for gi, c, s in sub:
                    placed.append((gi, c * sc + offset, s * sc))
        if above:
            boxes, ext = self._arrange(above, along_x_only=True)
            cur_top = max(c[1] + s[1] / 2 for _, c, s in placed)
            y0 = cur_top + 0.3
            for gi, c, s in boxes:
                placed.append((gi, c + np.array([0.0, y0, 0.0]), s))
        return placed

    def _arrange(self, members: list[int], along_x_only: bool = False) -> tuple[list, np.ndarray]:
        """Siblings' subtrees side by side: columns along x (left/right order), items in a column
        front to back along z (in front of / behind). Returns boxes with the arrangement's bottom
        at y=0, centred in x and z, and the arrangement's extent."""
        if not members:
            return [], np.zeros(3)
        subs = {m: self._subtree(m) for m in members}
        ext = {m: _extent(subs[m]) for m in members}
        mset = set(members)
        lifted = [self._lift(r, mset) for r in self.lateral]
        lifted = [r for r in lifted if r is not None]
        # columns: members linked by depth relations
        col = {m: m for m in members}

        def find(a: int) -> int:
            while col[a] != a:
                a = col[a]
            return a

        if not along_x_only:
            for a, key, b in lifted:
                if key in {"in_front_of", "behind"}:
                    col[find(a)] = find(b)
        columns: dict[int, list[int]] = {}
        for m in members:
            columns.setdefault(find(m), []).append(m)
        col_ids = list(columns)
        # x order of columns: stable topological sort by mention order honouring left/right
        before: set[tuple[int, int]] = set()
        for a, key, b in lifted:
            ca, cb = find(a), find(b)
            if ca == cb:
                continue
            if key == "left_of":
                before.add((ca, cb))
            elif key == "right_of":
                before.add((cb, ca))
        order = _topo(col_ids, before)
        # z order within a column: front (larger z) last
        out = []
        x_cursor = 0.0
        col_boxes = []
        for c in order:
            mem = columns[c]
            front_of: set[tuple[int, int]] = set()
            for a, key, b in lifted:
                if a in mem and b in mem:
                    if key == "in_front_of":
                        front_of.add((b, a))  # b behind a: b first (smaller z)
                    elif key == "behind":
                        front_of.add((a, b))
            zorder = _topo(mem, front_of)
            width = max((ext[m][1] - ext[m][0])[0] for m in mem)
            depth_total = sum((ext[m][1] - ext[m][0])[2] for m in mem) + self.GAP * (len(mem) - 1)
            z_cursor = -depth_total / 2
            items = []
            for m in zorder:
                lo, hi = ext[m]
                d = hi - lo
                zc = z_cursor + d[2] / 2
                shift = np.array([x_cursor + width / 2, 0.0, zc]) - np.array([(lo[0] + hi[0]) / 2, lo[1], (lo[2] + hi[2]) / 2])
                items.extend((gi, cc + shift, s) for gi, cc, s in subs[m])
                z_cursor += d[2] + self.GAP
            col_boxes.append(items)
            x_cursor += width + self.GAP
        total_w = x_cursor - self.GAP
        for items in col_boxes:
            out.extend((gi, c - np.array([total_w / 2, 0.0, 0.0]), s) for gi, c, s in items)
        lo, hi = _extent(out)
        return out, hi - lo

    def _lift(self, r: _Rel, members: set[int]) -> tuple[int, str, int] | None:
        """The relation moved up to the ancestors of its ends that are among ``members``."""
        a = self._ancestor_in(r.subject, members)
        b = self._ancestor_in(r.object, members)
        if a is None or b is None or a == b:
            return None
        return a, r.key, b

    def _ancestor_in(self, node: int, members: set[int]) -> int | None:
        steps = 0
        while node is not None and steps <= self.n:
            if node in members:
                return node
            node = self.parent[node]
            steps += 1
        return None

    def solve(self) -> tuple[list[tuple[int, np.ndarray, np.ndarray]], list[tuple[int, str, int]]]:
        roots = [k for k in range(self.n) if self.parent[k] is None]
        boxes, _ = self._arrange(roots)
        # Lateral relations are candidates; the caller keeps those the boxes bear out.
        realised = list(self.realised) + [(r.subject, r.key, r.object) for r in self.lateral]
        return boxes, realised


def _extent(boxes: list[tuple[int, np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    lo = np.min([c - s / 2 for _, c, s in boxes], axis=0)
    hi = np.max([c + s / 2 for _, c, s in boxes], axis=0)
    return lo, hi


def _topo(items: list[int], before: set[tuple[int, int]]) -> list[int]:
    """Stable topological order of ``items`` (given order breaks ties); edges in cycles are dropped."""
    order = list(items)
    pos = {x: i for i, x in enumerate(order)}
    remaining = list(order)
    edges = {(a, b) for a, b in before if a in pos and b in pos}
    out = []
    while remaining:
        free = [x for x in remaining if not any(b == x and a in remaining for a, b in edges)]
        pick = free[0] if free else remaining[0]  # a cycle: take the earliest and move on
        out.append(pick)
        remaining.remove(pick)
    return out
