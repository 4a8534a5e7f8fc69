"""Writing one benchmark's results into ``benchmarks/README.md`` in place.

The README is a title, an index table (``| script | what it measures | section |``) and one
``## `` section per benchmark. :func:`write_section` replaces a section (or appends it) and
adds the benchmark's index row when it has none; every other byte is kept.
"""

from __future__ import annotations

from pathlib import Path

INDEX_HEAD = "| script | what it measures | section |"


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the ``## heading`` section (up to the next ``## ``) replaced by
    ``## heading`` + ``body``, or with it appended when there is none."""
    block = f"## {heading}\n\n{body.strip()}\n"
    start = text.find(f"\n## {heading}\n")
    if start < 0:
        return text.rstrip() + "\n\n" + block
    nxt = text.find("\n## ", start + 1)
    rest = "" if nxt < 0 else "\n" + text[nxt + 1:]
    return text[:start + 1] + block + rest


def add_index_row(text: str, row: str, key: str) -> str:
    """``text`` with ``row`` appended to the index table unless a row there contains
    ``key``; a ValueError if the README has no index table."""
    start = text.find(INDEX_HEAD)
    if start < 0:
        raise ValueError(f"no index table ({INDEX_HEAD!r}) in the README")
    end = text.find("\n\n", start)
    end = len(text) if end < 0 else end
    if key in text[start:end]:
        return text
    return text[:end] + "\n" + row + text[end:]


def write_section(path: str | Path, heading: str, body: str, index_row: str,
                  key: str) -> Path:
    """Replace (or add) the ``## heading`` section of the README at ``path`` and make sure
    its index table has a row containing ``key`` (``index_row`` when missing)."""
    path = Path(path)
    text = path.read_text()
    text = add_index_row(replace_section(text, heading, body), index_row, key)
    path.write_text(text)
    return path
