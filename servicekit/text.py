"""Text every service can store and pass on: no NUL character, no lone surrogate."""

from __future__ import annotations


def text_problem(value: object) -> str | None:
    """The first string in parsed JSON that is not storable text, named by its path, and why; or None.

    JSON lets ``\\u0000`` and lone surrogates (``\\ud800``-``\\udfff``) through as escapes. PostgreSQL
    refuses NUL in text where SQLite stores it, exec refuses it in arguments and environments, and no
    UTF-8 encoder takes a lone surrogate. Both services refuse them wherever they are, keys included,
    so no field further in meets one. Iterative: as deep as the JSON parser let the document be.
    """
    pending: list[tuple[str, object]] = [("", value)]
    while pending:
        path, item = pending.pop()
        if isinstance(item, str):
            problem = _text_problem(item)
            if problem is not None:
                return f"{path or 'the body'} {problem}"
        elif isinstance(item, dict):
            children: list[tuple[str, object]] = []
            for key, child in item.items():
                problem = _text_problem(str(key))
                if problem is not None:
                    return f"a key in {path or 'the body'} {problem}"
                children.append((_child_path(path, str(key)), child))
            pending.extend(reversed(children))  # popped in document order
        elif isinstance(item, list):
            pending.extend((f"{path}[{i}]", item[i]) for i in reversed(range(len(item))))
    return None


def _text_problem(text: str) -> str | None:
    if "\0" in text:
        return "contains a NUL character (\\u0000), which no text field may hold"
    if not text.isascii():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return "contains a lone surrogate (\\ud800-\\udfff), which is not text"
    return None


def _child_path(path: str, key: str) -> str:
    shown = key if len(key) <= 40 else key[:40] + "..."
    if not path:
        return shown
    return f"{path}.{shown}" if shown.isidentifier() else f"{path}[{shown!r}]"
