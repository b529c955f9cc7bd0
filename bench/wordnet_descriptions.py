"""Descriptions of class names from WordNet, for zero-shot classification and LiT captions.

    python bench/wordnet_descriptions.py "T-shirt/top,Trouser,...,Ankle boot" --out desc.json

Each class name is looked up in WordNet's nouns (Debian's `wordnet-base`, read from
/usr/share/wordnet; `apt-get install wordnet-base`): the name as one lemma ("ankle boot" ->
ankle_boot), else each part of a name with "/" ("T-shirt/top"), else its last word ("boot").
Its most frequent sense gives the class's sentences: the definition, "a kind of X" for each
hypernym up to `--depth` levels, and "also called Y" for its synonyms. The output is the JSON
`vitkit train-clip`, `vitkit eval --zero-shot` and `vitkit predict --labels` take with
`--descriptions`. Names not found are reported and left without descriptions.

WordNet 3.0 is Princeton University's; its licence allows use and redistribution with its
notice, which the Debian package carries. The file written here is derived data: generate it
where it is used rather than keeping it in the repository.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

WORDNET = Path("/usr/share/wordnet")


@dataclass(frozen=True)
class Synset:
    lemmas: list[str]
    hypernyms: list[str]  # offsets
    gloss: str


class WordNet:
    """The noun part of a WordNet 3.0 database in its plain-text format."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data.noun"
        self.index: dict[str, list[str]] = {}
        for line in (root / "index.noun").read_text(encoding="latin-1").splitlines():
            if line.startswith(" "):  # the licence header
                continue
            fields = line.split()
            lemma, synset_count, pointer_count = fields[0], int(fields[2]), int(fields[3])
            # lemma pos synset_cnt p_cnt [ptr_symbol...] sense_cnt tagsense_cnt offsets...
            self.index[lemma] = fields[6 + pointer_count : 6 + pointer_count + synset_count]

    def senses(self, lemma: str) -> list[str]:
        """The synset offsets of a noun, most frequent sense first."""
        return self.index.get(lemma.lower().replace(" ", "_"), [])

    def synset(self, offset: str) -> Synset:
        with self.data.open("rb") as f:
            f.seek(int(offset))
            line = f.readline().decode("latin-1")
        head, _, gloss = line.partition(" | ")
        fields = head.split()
        count = int(fields[3], 16)
        lemmas = [fields[4 + 2 * i].replace("_", " ") for i in range(count)]
        at = 4 + 2 * count
        pointers = int(fields[at])
        hypernyms = [
            fields[at + 1 + 4 * i + 1]
            for i in range(pointers)
            if fields[at + 1 + 4 * i] in ("@", "@i")
        ]
        # The definition, without the usage examples that follow it in quotes.
        definition = gloss.split('; "')[0].strip().rstrip(";")
        if definition.startswith("("):  # a usage note such as "(usually in the plural)"
            definition = definition.partition(") ")[2] or definition
        return Synset(lemmas, hypernyms, definition)


def lookup(wordnet: WordNet, name: str) -> str | None:
    """The offset of the class name's most frequent sense, trying the whole name, its parts
    around "/" and its last word."""
    candidates = [name, *name.split("/"), name.split()[-1]]
    for candidate in candidates:
        senses = wordnet.senses(candidate.strip())
        if senses:
            return senses[0]
    return None


def describe(wordnet: WordNet, name: str, depth: int) -> list[str]:
    offset = lookup(wordnet, name)
    if offset is None:
        return []
    synset = wordnet.synset(offset)
    sentences = [synset.gloss]
    others = [lemma for lemma in synset.lemmas if lemma.lower() != name.lower()]
    if others:
        sentences.append("also called " + ", ".join(others))
    level = synset.hypernyms[:1]
    for _ in range(depth):
        if not level:
            break
        parent = wordnet.synset(level[0])
        sentences.append(f"a kind of {parent.lemmas[0]}")
        level = parent.hypernyms[:1]
    return sentences


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("classes", help="comma-separated class names")
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--depth", type=int, default=2, help="hypernym levels")
    p.add_argument("--wordnet", type=Path, default=WORDNET)
    args = p.parse_args()
    if not (args.wordnet / "index.noun").is_file():
        print(f"{args.wordnet}: no WordNet here (apt-get install wordnet-base)", file=sys.stderr)
        return 1
    wordnet = WordNet(args.wordnet)
    names = [c.strip() for c in args.classes.split(",") if c.strip()]
    out = {name: describe(wordnet, name, args.depth) for name in names}
    for name, sentences in out.items():
        print(f"{name}: {' | '.join(sentences) if sentences else '(not in WordNet)'}")
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
