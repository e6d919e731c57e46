"""What may name a domain here: a domain's name becomes a directory of the repository
and part of restored images' file names (:func:`domain_name_problem`)."""

from __future__ import annotations

import unicodedata


def domain_name_problem(value: str) -> str | None:
    """Why ``value`` cannot name a domain here, or None.

    A domain's name becomes a repository directory: nothing that could leave it, nothing
    a file system refuses (over 255 bytes), nothing a terminal or a log line would
    misread (control characters, line separators, undecodable bytes).
    """
    if not value:
        return "must not be empty"
    if len(value.encode("utf-8", errors="surrogatepass")) > 255:
        return "longer than 255 bytes"
    if value in (".", "..") or "/" in value:
        return "not a usable domain name (no '/', '.' or '..')"
    if any(unicodedata.category(c) in ("Cc", "Cs", "Zl", "Zp") for c in value):
        return "not a usable domain name (control characters)"
    return None
