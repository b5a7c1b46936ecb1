#!/usr/bin/env python3
"""Write the services' shared blocks from their source, or check them (--check).

A block starts with `# --- shared: NAME (identical in a.py, b.py) ---` and ends
with `# --- end of shared: NAME ---`. The first file its header names is the
source: edit the block there, then run this script to copy it into the others.

    python3 scripts/shared_blocks.py           copy every block from its source
    python3 scripts/shared_blocks.py --check   exit 1, naming each copy that differs
"""

import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SERVICES = ("gateway.py", "inventory.py", "billing.py")
_START = re.compile(r"^# --- shared: (\S+) \(identical in ([^)]+)\) ---$", re.M)


def blocks(text):
    """{name: (files named in its header, (start, end) of its text)} in text."""
    found = {}
    for match in _START.finditer(text):
        name = match.group(1)
        end = text.find(f"\n# --- end of shared: {name} ---", match.end())
        if end == -1:
            raise ValueError(f"shared block {name} has no end marker")
        if name in found:
            raise ValueError(f"shared block {name} appears twice")
        files = tuple(f.strip() for f in match.group(2).split(","))
        found[name] = (files, (match.start(), end))
    return found


def sync(texts):
    """(texts with every copy made equal to its source, problems found)."""
    texts, problems = dict(texts), []
    sources = {}
    for text in texts.values():
        for name, (files, _) in blocks(text).items():
            if len(files) < 2:
                problems.append(f"{name}: a shared block must name two files or more")
            sources.setdefault(name, files)
    for name, files in sources.items():
        source = files[0]
        if source not in texts or name not in blocks(texts[source]):
            problems.append(f"{name}: missing from {source}, its source")
            continue
        start, end = blocks(texts[source])[name][1]
        wanted = texts[source][start:end]
        for path in files[1:]:
            here = blocks(texts.get(path, "")).get(name)
            if here is None:
                problems.append(f"{name}: missing from {path}")
                continue
            start, end = here[1]
            if texts[path][start:end] != wanted:
                problems.append(f"{name}: {path} differs from {source}")
                texts[path] = texts[path][:start] + wanted + texts[path][end:]
    return texts, problems


def main(argv):
    """Copy the blocks (or only check them); the exit status says how it went."""
    check = argv[1:] == ["--check"]
    if argv[1:] and not check:
        sys.exit(__doc__)
    texts = {name: (ROOT / name).read_text() for name in SERVICES}
    try:
        synced, problems = sync(texts)
    except ValueError as exc:
        sys.exit(f"shared blocks: {exc}")
    missing = [p for p in problems if "differs" not in p]
    if missing:
        sys.exit("shared blocks: " + "; ".join(missing))
    if check:
        if problems:
            sys.exit(
                "shared blocks: "
                + "; ".join(problems)
                + ". Edit a block in its source (the first file its header names),"
                " then run: python3 scripts/shared_blocks.py"
            )
        return
    for name, text in synced.items():
        if text != texts[name]:
            (ROOT / name).write_text(text)
            print(f"wrote the shared blocks of {name}")


if __name__ == "__main__":
    main(sys.argv)
