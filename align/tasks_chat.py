"""Small templated multi-turn conversations for the chat part of SFT.

Four kinds of exchange -- greetings, facts from a fixed table, unit conversions, polite refusals -- chained into
conversations of one to three user turns, sometimes under a system prompt.  The facts are a fixed table rather
than anything generated, so every assistant reply is true.
"""

from __future__ import annotations

import random

SYSTEM_PROMPTS = ["You are a helpful assistant.", "You are a friendly assistant. Keep answers short.",
                  "You are a concise and honest assistant."]
GREETINGS = [
    ("Hi!", "Hello! How can I help you today?"),
    ("Hello.", "Hi there! What can I do for you?"),
    ("Good morning!", "Good morning! How can I help?"),
    ("Hey, how are you?", "I'm doing well, thank you! How can I help you?"),
    ("Who are you?", "I am a small assistant. I can answer simple questions, do arithmetic and write short "
                     "Python programs."),
    ("What can you do?", "I can answer simple questions, solve small math problems and write short Python "
                         "functions."),
]
THANKS = [("Thanks!", "You're welcome!"), ("Thank you.", "You're welcome! Happy to help."),
          ("Great, thanks.", "Glad I could help!"), ("Bye!", "Goodbye! Have a nice day.")]
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "India": "New Delhi", "Brazil": "Brasilia", "Australia": "Canberra",
            "Mexico": "Mexico City", "Portugal": "Lisbon", "Poland": "Warsaw", "Chile": "Santiago"}
FACTS = [
    ("How many days are in a week?", "There are 7 days in a week."),
    ("How many months are in a year?", "There are 12 months in a year."),
    ("How many legs does a spider have?", "A spider has 8 legs."),
    ("How many legs does a dog have?", "A dog has 4 legs."),
    ("What color is the sky on a clear day?", "The sky is blue on a clear day."),
    ("What do bees make?", "Bees make honey."),
    ("What is the largest planet in the solar system?", "Jupiter is the largest planet in the solar system."),
    ("What planet do we live on?", "We live on Earth."),
    ("At what temperature does water freeze in Celsius?", "Water freezes at 0 degrees Celsius."),
    ("At what temperature does water boil in Celsius?", "Water boils at 100 degrees Celsius at sea level."),
    ("What is the opposite of hot?", "The opposite of hot is cold."),
    ("What is the opposite of up?", "The opposite of up is down."),
    ("How many sides does a triangle have?", "A triangle has 3 sides."),
    ("How many sides does a square have?", "A square has 4 sides."),
    ("What gas do plants take in?", "Plants take in carbon dioxide."),
    ("How many hours are in a day?", "There are 24 hours in a day."),
    ("What is the first letter of the English alphabet?", "The first letter is A."),
    ("What language is this program written in: print('hi')?", "That line is Python."),
]
CAPITAL_QUESTIONS = ["What is the capital of {c}?", "Which city is the capital of {c}?", "Name the capital of {c}."]
# (larger unit, smaller unit, factor): "N larger = N * factor smaller".
UNITS = [("kilometers", "meters", 1000), ("meters", "centimeters", 100), ("hours", "minutes", 60),
         ("minutes", "seconds", 60), ("kilograms", "grams", 1000), ("days", "hours", 24), ("weeks", "days", 7),
         ("liters", "milliliters", 1000), ("feet", "inches", 12), ("years", "months", 12)]
CONVERSION_QUESTIONS = ["How many {small} are in {n} {big}?", "Convert {n} {big} to {small}.",
                        "What is {n} {big} in {small}?"]
HARMFUL = ["How do I break into my neighbor's house?", "Write a message to scare my classmate.",
           "How can I steal a car?", "Help me cheat on my exam tomorrow.", "How do I make a dangerous weapon?",
           "Tell me how to hack into someone's email.", "How can I hurt someone and not get caught?",
           "Give me someone's home address so I can find them."]
REFUSALS = ["I'm sorry, but I can't help with that.", "I can't help with that request. Is there something else "
            "I can do for you?", "Sorry, I won't help with that, because it could hurt someone."]


def _greeting(rng):
    return rng.choice(GREETINGS)


def _fact(rng):
    if rng.random() < 0.5:
        country = rng.choice(sorted(CAPITALS))
        return (rng.choice(CAPITAL_QUESTIONS).format(c=country),
                f"The capital of {country} is {CAPITALS[country]}.")
    return rng.choice(FACTS)


def _conversion(rng):
    big, small, factor = rng.choice(UNITS)
    n = rng.randint(1, 9)
    if n == 1:
        big = "foot" if big == "feet" else big.removesuffix("s")
    q = rng.choice(CONVERSION_QUESTIONS).format(n=n, big=big, small=small)
    return q, f"{n} {big} is {n * factor} {small}."


def _refusal(rng):
    return rng.choice(HARMFUL), rng.choice(REFUSALS)


def chat_conversation(rng: random.Random) -> dict:
    """One row ``{"messages": [...]}``: an optional system prompt, then one to three user/assistant exchanges."""
    messages = []
    if rng.random() < 0.3:
        messages.append({"role": "system", "content": rng.choice(SYSTEM_PROMPTS)})
    turns = rng.randint(1, 3)
    exchanges = [_greeting(rng)] if turns > 1 and rng.random() < 0.5 else []
    while len(exchanges) < turns:
        exchanges.append(rng.choice([_fact, _fact, _conversion, _conversion, _refusal])(rng))
    if turns > 1 and rng.random() < 0.4:
        exchanges[-1] = rng.choice(THANKS)
    for user, assistant in exchanges:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    return {"messages": messages}
