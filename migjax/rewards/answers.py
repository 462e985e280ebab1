"""Answers as text: extraction from a completion (tags, \\boxed), number normalisation and
the cheap exact/numeric equivalence the verifier tries before the symbolic checker."""

from __future__ import annotations

import re
from fractions import Fraction

_MAX_FRACTION_DIGITS = 1000  # longer literals are compared as canonical strings, never as ints
_MAX_ALT_DENOMINATOR = 10  # a decimal answer gets a fraction variant only up to this


def _boxed_content(text: str, start: int) -> str | None:
    """Content of the `\\boxed` whose name ends at `start`: balanced `{...}` or a bare token."""
    i = start
    while i < len(text) and text[i] == " ":
        i += 1
    if i < len(text) and text[i] == "{":
        depth, j = 0, i
        while j < len(text):
            c = text[j]
            if c == "\\":
                j += 2
                continue
            if c == "{":
                depth += 1
            elif c == "}":
                depth -= 1
                if depth == 0:
                    return text[i + 1 : j].strip() or None
            j += 1
        return None
    if i > start:  # `\boxed 5`: the token after the space
        m = re.match(r"[^\s$]+", text[i:])
        return m.group(0) if m else None
    return None


def _last_boxed(text: str) -> str | None:
    starts = [m.end() for m in re.finditer(r"\\boxed(?![A-Za-z])", text)]
    for start in reversed(starts):
        content = _boxed_content(text, start)
        if content:
            return content
    return None


def _tagged(text: str, open_tag: str, close_tag: str) -> str | None:
    """Content of the last open/close pair, or None when the tags are absent or unbalanced."""
    if not open_tag or not close_tag:
        return None
    pattern = f"({re.escape(open_tag)})|{re.escape(close_tag)}"
    tokens = list(re.finditer(pattern, text))
    if not tokens:
        return None
    for i, m in enumerate(tokens):
        if (m.group(1) is not None) != (i % 2 == 0):
            return None
    if len(tokens) % 2:
        return None
    content = text[tokens[-2].end() : tokens[-1].start()].strip()
    if "\\boxed" in content:
        content = _last_boxed(content) or content
    return content or None


def extract_answer(
    text: str, *, answer_open: str = "<answer>", answer_close: str = "</answer>"
) -> str | None:
    """The final answer in `text`: the last tagged answer, else the last `\\boxed`, else the
    text after the last `####`; None when none is found. Never raises."""
    if not isinstance(text, str) or not text:
        return None
    ans = _tagged(text, answer_open, answer_close)
    if ans is not None:
        return ans
    ans = _last_boxed(text)
    if ans is not None:
        return ans
    k = text.rfind("####")
    if k >= 0:
        rest = text[k + 4 :].split("\n", 1)[0].strip()
        return rest or None
    return None


_DEC_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)")
_FRAC_RE = re.compile(r"([+-]?\d+)\s*/\s*([+-]?\d+)")
_TEX_FRAC_RE = re.compile(
    r"([+-]?)\\[dt]?frac(?:\{\s*([+-]?\d+)\s*\}\{\s*([+-]?\d+)\s*\}|(\d)(\d))"
)
_THOUSANDS_RE = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?")


def clean(s: str) -> str:
    """Strip math delimiters, currency, percent, degree marks and thousands separators."""
    s = s.strip()
    for a, b in (("\\(", "\\)"), ("\\[", "\\]")):
        if s.startswith(a) and s.endswith(b):
            s = s[2:-2].strip()
    for tok in ("\\!", "\\,", "\\;", "\\ ", "\\$", "$", "\\%", "%", "^{\\circ}", "^\\circ"):
        s = s.replace(tok, "")
    s = s.replace("{,}", ",").strip().rstrip(".").strip()
    if _THOUSANDS_RE.fullmatch(s):
        s = s.replace(",", "")
    m = re.fullmatch(r"([+-]?)\(\s*([+-]?)(\d[\d.]*(?:\s*/\s*\d+)?)\s*\)", s)  # -(1/3)
    if m:
        s = ("-" if (m.group(1) == "-") != (m.group(2) == "-") else "") + m.group(3)
    return re.sub(r"\s+", " ", s).strip()


def _big_decimal(s: str) -> str:
    """Canonical string of a decimal literal too long to convert to an int."""
    sign = "-" if s.startswith("-") else ""
    body = s.lstrip("+-")
    whole, _, frac = body.partition(".")
    whole, frac = whole.lstrip("0") or "0", frac.rstrip("0")
    out = whole + ("." + frac if frac else "")
    return "0" if out == "0" else sign + out


def parse_number(s: str) -> Fraction | str | None:
    """A number as an exact Fraction (or canonical string when huge); None if not a number."""
    c = clean(s)
    if _DEC_RE.fullmatch(c):
        if len(c) > _MAX_FRACTION_DIGITS:
            return _big_decimal(c)
        return Fraction(c)
    m = _FRAC_RE.fullmatch(c)
    parts: tuple[str, str, str] | None = None
    if m:
        parts = ("", m.group(1), m.group(2))
    else:
        m = _TEX_FRAC_RE.fullmatch(c)
        if m:
            parts = (m.group(1), m.group(2) or m.group(4), m.group(3) or m.group(5))
    if parts is None or len(parts[1]) + len(parts[2]) > _MAX_FRACTION_DIGITS:
        return None
    num, den = int(parts[1]), int(parts[2])
    if den == 0:
        return None
    value = Fraction(num, den)
    return -value if parts[0] == "-" else value


def _decimal_str(value: Fraction) -> str | None:
    """Exact decimal string of `value`, or None when its expansion does not terminate."""
    den, k2, k5 = value.denominator, 0, 0
    while den % 2 == 0:
        den, k2 = den // 2, k2 + 1
    while den % 5 == 0:
        den, k5 = den // 5, k5 + 1
    if den != 1:
        return None
    k = max(k2, k5)
    scaled = abs(value.numerator) * 10**k // value.denominator
    digits = str(scaled).rjust(k + 1, "0")
    whole, frac = digits[: len(digits) - k], digits[len(digits) - k :].rstrip("0")
    sign = "-" if value < 0 else ""
    return sign + whole + ("." + frac if frac else "")


def _canonical(value: Fraction) -> str:
    if value.denominator == 1:
        return str(value.numerator)
    return _decimal_str(value) or f"{value.numerator}/{value.denominator}"


def normalize_number(s: str) -> str:
    """Canonical string of a numeric answer ("1,000" -> "1000", "3.0" -> "3", "$5" -> "5",
    "50%" -> "50", "\\frac{1}{2}" -> "0.5", "2/3" -> "2/3"); other text comes back cleaned."""
    value = parse_number(s)
    if value is None:
        return clean(s)
    return value if isinstance(value, str) else _canonical(value)


def answer_variants(raw: str) -> tuple[str, ...]:
    """Equivalent reference strings for one answer: its own (cleaned) form first, then a
    short alternative form of a non-integer number (`"1/2"` -> `("1/2", "0.5")`,
    `"1.25"` -> `("1.25", "5/4")`); alternatives longer than that are left out."""
    raw = raw.strip()
    value = parse_number(raw)
    if not isinstance(value, Fraction):
        return (normalize_number(raw),) if isinstance(value, str) else (raw,)
    out = [raw] if "\\" in clean(raw) else []
    if value.denominator == 1:
        out.append(str(value.numerator))
    else:
        frac, dec = f"{value.numerator}/{value.denominator}", _decimal_str(value)
        short_dec = dec if dec is not None and len(dec.partition(".")[2]) <= 4 else None
        short_frac = frac if value.denominator <= _MAX_ALT_DENOMINATOR else None
        if "/" in raw or "frac" in raw:
            out.extend(f for f in (frac, short_dec) if f is not None)
        else:
            out.extend(f for f in (dec, short_frac) if f is not None)
    return tuple(dict.fromkeys(out))


def numbers_equal(a: Fraction | str, b: Fraction | str) -> bool:
    if isinstance(a, Fraction) and isinstance(b, Fraction):
        return a == b or abs(a - b) <= Fraction(1, 10**6) * max(abs(a), abs(b))
    return isinstance(a, str) and a == b
