"""How a country is named inside a sentence: "the capital of the Cook Islands", not "of Cook
Islands". Only question text uses this; tool arguments keep the graph's names."""

from __future__ import annotations

import re

_TAKES_THE = re.compile(
    r"(Islands|Republic|Territory|Territories|Emirates|Kingdom|States|Bahamas|Gambia|Maldives"
    r"|Comoros|Philippines)$|^(Republic of|Democratic Republic|Isle of)"
)
_NO_THE = frozenset({"South Georgia and the South Sandwich Islands"})


def mention(country: str) -> str:
    """The country's name as it reads mid-sentence, with "the" where English puts one."""
    if country.startswith("The "):
        return "the " + country[4:]
    if country not in _NO_THE and _TAKES_THE.search(country):
        return "the " + country
    return country


def sentence(text: str) -> str:
    """Capitalise the first letter, for templates that start with a country."""
    return text[:1].upper() + text[1:]
