"""How a configuration file's validation errors are phrased: one line per problem,
``[section] key: problem, got value`` (:func:`describe`), in the order the keys appear
in the file (:func:`position`)."""

from __future__ import annotations

from pydantic_core import ErrorDetails


def position(data: object, loc: tuple[int | str, ...]) -> tuple[int, ...]:
    """Where ``loc`` is in the parsed file, as indexes of keys in document order."""
    indexes: list[int] = []
    for part in loc:
        if not isinstance(data, dict) or part not in data:
            break
        indexes.append(list(data).index(part))
        data = data[part]
    return tuple(indexes)


def describe(error: ErrorDetails) -> str:
    """Phrase one pydantic error as ``[section] key: problem, got value``."""
    loc = [str(part) for part in error["loc"]]
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            return f"unknown section [{loc[0]}]"
        return f"[{'.'.join(loc[:-1])}] unknown key '{loc[-1]}'"
    if len(loc) > 2 and loc[-1] == "[key]":  # a key of a table of names (pydantic's loc)
        where = f"[{'.'.join(loc[:-2])}] key {loc[-2]!r}"
    else:
        where = loc[0] if len(loc) == 1 else f"[{'.'.join(loc[:-1])}] {loc[-1]}"
    return f"{where}: {_problem(error)}, got {_show(error['input'])}"


_PROBLEMS = {
    "int_type": "expected an integer",
    "float_type": "expected a number",
    "string_type": "expected a string",
    "bool_type": "expected true or false",
    "path_type": "expected a path as a string",
    "model_type": "expected a table",
    "finite_number": "expected a finite number",
    "string_too_short": "must not be empty",
}

_BOUNDS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}


def _problem(error: ErrorDetails) -> str:
    ctx = error.get("ctx", {})
    if error["type"] in _PROBLEMS:
        return _PROBLEMS[error["type"]]
    if error["type"] == "literal_error":
        return f"expected {ctx['expected']}"
    if error["type"] == "value_error":
        return one_line(str(ctx["error"]))
    for bound, symbol in _BOUNDS.items():
        if bound in ctx:
            return f"must be {symbol} {ctx[bound]}"
    # Unforeseen error types: pydantic's own wording is still specific enough.
    msg = error["msg"]
    return one_line(msg[:1].lower() + msg[1:])


def _show(value: object) -> str:
    """The offending value as the user wrote it (TOML booleans, shortened if long)."""
    text = ("true" if value else "false") if isinstance(value, bool) else repr(value)
    text = one_line(text)
    return text if len(text) <= 60 else text[:57] + "..."


def one_line(text: str) -> str:
    return " ".join(text.split())
