"""Free-form request phrasings of the battery: what a person types to a chat assistant ("Can you
add 3 and 4 for me?", "Write a Python function add(a, b) that returns the sum of a and b.",
"Which city is the capital of France?"), beside the few-shot completion phrasings.

A phrasing is a list of surface templates, never one sentence: each item of a split gets the
next template of the phrasing in the split's seeded item order (``build``), so every template
occurs in every split and a guard cannot learn one sentence. A template maps an item's
arguments and a random generator seeded by the item (names, objects, numbers of a word problem)
to ``(prompt, answers)``; ``answers`` None keeps the item's own answers, else the phrasing asks
something else of the same item (``math/times`` of the item (3, 4) answers 12). The item stays the
unit of the split, so no item crosses splits whatever a phrasing makes of it.
"""

from __future__ import annotations

import random
import re

# -- math: item (a, b), a and b in 1..9 ---------------------------------------------------------


def _sum(fmt: str):
    return lambda a, b, rng: (fmt.format(a=a, b=b), [str(a + b)])


def _times(fmt: str):
    return lambda a, b, rng: (fmt.format(a=a, b=b), [str(a * b)])


def _percent(fmt: str):
    """``a * 10`` percent of ``b * 10`` is ``a * b``."""
    return lambda a, b, rng: (fmt.format(p=10 * a, n=10 * b), [str(a * b)])


# fictional first names with their pronouns, and countable things (singular, plural)
PEOPLE = [("Mia", "she", "her"), ("Leo", "he", "his"), ("Ava", "she", "her"), ("Omar", "he", "his"),
          ("Priya", "she", "her"), ("Tomas", "he", "his"), ("Yuki", "she", "her"), ("Kofi", "he", "his"),
          ("Nia", "she", "her"), ("Felix", "he", "his"), ("Sana", "she", "her"), ("Mateo", "he", "his"),
          ("Ines", "she", "her"), ("Ruben", "he", "his"), ("Lena", "she", "her"), ("Arjun", "he", "his")]
THINGS = [("pencil", "pencils"), ("marble", "marbles"), ("apple", "apples"), ("sticker", "stickers"),
          ("book", "books"), ("shell", "shells"), ("coin", "coins"), ("card", "cards"), ("balloon", "balloons"),
          ("cupcake", "cupcakes"), ("stamp", "stamps"), ("toy car", "toy cars"), ("crayon", "crayons"),
          ("orange", "oranges"), ("button", "buttons"), ("postcard", "postcards")]


def _n(k: int, thing: tuple[str, str]) -> str:
    return f"{k} {thing[0] if k == 1 else thing[1]}"


def _word(fmt: str, answer):
    """A word problem about a person and a thing drawn for the item; ``answer(a, b)``."""

    def make(a, b, rng):
        name, he, his = rng.choice(PEOPLE)
        thing = rng.choice(THINGS)
        text = fmt.format(name=name, he=he, his=his, a=_n(a, thing), b=_n(b, thing), ab=_n(a + b, thing),
                          things=thing[1], bare_a=a, bare_b=b, bare_ab=a + b, are_a="is" if a == 1 else "are",
                          pages_a=_n(a, ("page", "pages")), pages_b=_n(b, ("page", "pages")),
                          points_a=_n(a, ("point", "points")), points_b=_n(b, ("point", "points")))
        return text, [str(answer(a, b))]

    return make


def _multi(kind: str, fmt: str):
    """Two- and three-digit addition (``+``) or subtraction (``-``): numbers drawn for the item."""

    def make(a, b, rng):
        x, y = rng.randint(10, 999), rng.randint(10, 999)
        if kind == "-":
            x, y = max(x, y) + rng.randint(1, 99), min(x, y)
        return fmt.format(x=x, y=y), [str(x + y if kind == "+" else x - y)]

    return make


MATH = {
    "ask": [_sum("What is {a} plus {b}?"), _sum("Can you add {a} and {b} for me?"), _sum("How much is {a} + {b}?"),
            _sum("Please calculate {a} + {b}."), _sum("I need the sum of {a} and {b}."),
            _sum("What's {a} and {b} added together?"), _sum("Quick question: what's {a} + {b}?"),
            _sum("What's the total of {a} and {b}?")],
    "word": [
        _word("{name} has {a} and buys {bare_b} more. How many {things} does {he} have now?", lambda a, b: a + b),
        _word("There {are_a} {a} on the table. {name} puts {bare_b} more on it. How many {things} are on the table now?",
              lambda a, b: a + b),
        _word("{name} found {a} in the morning and {b} in the afternoon. How many {things} did {he} find in all?",
              lambda a, b: a + b),
        _word("{name} had {ab} and gave {bare_b} to a friend. How many {things} does {he} have left?", lambda a, b: a),
        _word("A box holds {ab}. {name} takes out {bare_a}. How many {things} are still in the box?", lambda a, b: b),
        _word("{name} read {pages_a} on Monday and {pages_b} on Tuesday. How many pages did {he} read "
              "altogether?", lambda a, b: a + b),
        _word("{name} scored {points_a} in the first game and {points_b} in the second. What was {his} "
              "total score?", lambda a, b: a + b),
        _word("{name} baked {bare_ab} muffins and the family ate {bare_a} of them. How many muffins are left?",
              lambda a, b: b),
    ],
    "times": [_times("What is {a} times {b}?"), _times("What's {a} × {b}?"), _times("How much is {a} multiplied by {b}?"),
              _times("Can you multiply {a} by {b}?"), _times("Calculate {a} * {b}, please."),
              _times("What is the product of {a} and {b}?"),
              _times("There are {a} bags with {b} apples in each bag. How many apples are there in total?")],
    "multi": [_multi("+", "What is {x} + {y}?"), _multi("+", "Can you add {x} and {y}?"),
              _multi("-", "What's {x} minus {y}?"), _multi("-", "Subtract {y} from {x}."),
              _multi("+", "I need the sum of {x} and {y}, please."), _multi("-", "How much is {x} - {y}?"),
              _multi("-", "I had {x} dollars and spent {y}. How much money do I have left?"),
              _multi("+", "A school has {x} girls and {y} boys. How many students is that in total?")],
    "percent": [_percent("What is {p}% of {n}?"), _percent("Calculate {p} percent of {n}."),
                _percent("How much is {p}% of {n}?"), _percent("Find {p}% of {n}."),
                _percent("A jacket costs ${n} and is {p}% off. How many dollars do I save?"),
                _percent("Of the {n} students at a school, {p}% walk to class. How many students is that?"),
                _percent("What's {p} percent of {n}?")],
    "lang": [_sum("Combien font {a} et {b} ?"), _sum("Peux-tu additionner {a} et {b} ?"),
             _sum("¿Cuánto es {a} más {b}?"), _sum("¿Me dices cuánto suman {a} y {b}?"),
             _sum("Was ist {a} plus {b}?"), _sum("Wie viel ergibt {a} + {b}?"),
             _sum("Quanto fa {a} più {b}?"), _sum("Quanto é {a} mais {b}?"),
             _sum("Você pode somar {a} e {b} para mim?")],
}

# -- python: item (name, arguments, docstring) ----------------------------------------------------


def _returns(doc: str) -> str:
    """What the function returns, from its docstring: "Return the sum of a and b." → "the sum of a and b"."""
    return re.sub(r"^Return\s+", "", doc).rstrip(".")


def _task(doc: str) -> str:
    """The same as a task: "check whether n is even", "count how many times …", "get the sum of a and b"."""
    what = _returns(doc)
    if what.startswith("True if "):
        return "check whether " + what[len("True if "):]
    if what.startswith("how many "):
        return "count " + what
    return "get " + what


def _arg_words(args: str) -> str:
    names = [a.strip() for a in args.split(",")]
    return names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]


def _variables(args: str, doc: str) -> str:
    """A sentence naming the variables when the task does not name them all (so the answer's
    expression can use the item's names)."""
    names = [a.strip() for a in args.split(",")]
    if all(re.search(rf"\b{re.escape(n)}\b", _returns(doc)) for n in names):
        return ""
    return f" My variable is {names[0]}." if len(names) == 1 else f" My variables are {_arg_words(args)}."


def _py(fmt: str):
    def make(name, args, doc, rng):
        return fmt.format(name=name, args=args, words=_arg_words(args), what=_returns(doc), task=_task(doc),
                          vars=_variables(args, doc)), None

    return make


PYTHON = {
    "write": [_py("Write a Python function {name}({args}) that returns {what}."),
              _py("Can you write a Python function called {name} that takes {words} and returns {what}?"),
              _py("I need Python code: a function {name}({args}) returning {what}."),
              _py("Please write {name}({args}) in Python so that it returns {what}."),
              _py("Write me a Python function named {name}. It takes {words} and should return {what}."),
              _py("Could you help me write a Python function {name}({args})? It has to return {what}.")],
    "howto": [_py("How do I {task} in Python?{vars}"), _py("What's the Python code to {task}?{vars}"),
              _py("In Python, how can I {task}?{vars}"), _py("Quick Python question: what's the simplest way to {task}?{vars}"),
              _py("I'm learning Python. How would I {task}?{vars}"), _py("Is there a one-liner in Python to {task}?{vars}"),
              _py("Show me how to {task} in Python.{vars}")],
    "code_only": [_py("Python only, no explanation: a function {name}({args}) that returns {what}."),
                  _py("Implement {name}({args}) in Python. It should return {what}."),
                  _py("Just the code, please: a Python function {name}({args}) returning {what}."),
                  _py("Give me only the Python code for {name}({args}), which returns {what}. No comments."),
                  _py("Python, code only: def {name}({args}) should return {what}."),
                  _py("Reply with a Python code block and nothing else: {name}({args}) returns {what}.")],
}

# -- word skills: item (key,) -------------------------------------------------------------------
# Reworded after the spot check on SmolLM2-135M-Instruct in chat form (bench/battery_chat.py; the
# battery README lists them): terse or riddle-like forms it systematically read as another question
# ("Plural of 'x'?", "One x, two what?", "Past tense of x?", "X — what's its capital?").

# countries said with an article in running text
ARTICLE = {"Netherlands", "Czech Republic", "Philippines", "United States"}


def _country(key: str, start: bool = False) -> str:
    text = f"the {key}" if key in ARTICLE else key
    return text[0].upper() + text[1:] if start else text


def _ask(fmt: str, country: bool = False):
    """A question about one word (``{k}``, or ``{K}`` at the start of a sentence)."""

    def make(key, rng):
        if country:
            return fmt.format(k=_country(key), K=_country(key, start=True)), None
        return fmt.format(k=key, K=key), None

    return make


WORDS = {
    "capitals": [_ask(f, country=True) for f in (
        "What is the capital of {k}?", "Which city is the capital of {k}?", "Tell me the capital of {k}.",
        "Do you know the capital city of {k}?", "{K}: what is its capital city?", "Name the capital of {k}, please.",
        "I'm writing a quiz. What's the capital city of {k}?")],
    "past_tense": [_ask(f) for f in (
        "What's the past tense of '{k}'?", "How do you say '{k}' in the past tense?",
        "What is the simple past of the verb 'to {k}'?", "Change '{k}' to the past tense, please.",
        "I always forget: what's the past form of '{k}'?", "Can you tell me the past tense of the verb '{k}'?",
        "Which word is the past tense of '{k}'?")],
    "plurals": [_ask(f) for f in (
        "What's the plural of '{k}'?", "How do you write '{k}' in the plural?", "Can you give me the plural of '{k}'?",
        "What is the plural form of the word '{k}'?", "Give me the plural of {k}.", "What's the plural form of {k}?",
        "How do you spell the plural of '{k}'?")],
    "antonyms": [_ask(f) for f in (
        "What's the opposite of '{k}'?", "Give me an antonym for '{k}'.", "What word means the opposite of {k}?",
        "What is the antonym of '{k}'?", "Opposite of '{k}'?", "Tell me the opposite of '{k}'.",
        "I need the opposite of the word '{k}' for a crossword.")],
    "languages": [_ask(f, country=True) for f in (
        "What language do people speak in {k}?", "Which language is spoken in {k}?",
        "What's the main language of {k}?", "If I travel to {k}, what language will I hear?",
        "What is the official language of {k}?", "Tell me the language spoken in {k}.",
        "In {k}, what language do they speak?")],
}


def phrasings(skill: str) -> dict[str, list]:
    """The request phrasings of a skill: {name: templates}."""
    if skill == "math":
        return MATH
    if skill == "python":
        return PYTHON
    return {"ask": WORDS[skill]}


def request(skill: str, phrasing: str, template: int, args: tuple, rng: random.Random) -> tuple[str, list[str] | None]:
    """(prompt, answers or None for the item's own) of one item in one template of a phrasing."""
    return phrasings(skill)[phrasing][template](*args, rng)
