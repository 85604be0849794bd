"""PII and credential scrubbing: find emails, IPs, phones, card numbers and secrets in one
document and replace each with a typed placeholder; it does not decide what a corpus keeps.

`scrub(text)` returns the masked text and a count per type. Placeholders and count keys:

    <EMAIL>        email        any address except those on reserved example domains (below)
    <IP_ADDRESS>   ip_address   public (globally routable) IPv4 and IPv6 addresses only
    <PHONE>        phone        North American 3-3-4 numbers and "+"-prefixed international numbers
    <CREDIT_CARD>  credit_card  13-19 digits, optionally grouped by spaces/dashes, with a card
                                network prefix and a valid Luhn check digit
    <SECRET>       secret       PEM private-key blocks; AWS access key ids (AKIA/ASIA...) and
                                secret keys next to an "aws ... secret" name; GitHub, Slack,
                                Google, Stripe tokens and JWTs by their fixed prefixes;
                                `Authorization:` header values and `Bearer <token>`; passwords
                                in URLs (`scheme://user:PASSWORD@host`); and values assigned to a
                                name containing password/passwd/passphrase/pwd/secret/token/
                                api_key/access_key/private_key/credential(s) whose Shannon
                                entropy is >= ENTROPY_BITS bits per character

Choices, each made against the default corpus (Python's standard library source, 31.5 MB):

* Example addresses are not masked: RFC 2606/6761 reserve example.com/.net/.org and the
  .example, .test, .invalid and .localhost domains, so no person can own them, and
  documentation reads naturally with them left in. Every other address is masked, including
  the maintainers' addresses in the stdlib's headers: public, but still personal.
* Only global IP addresses are masked (the rule datatrove's PIIFormatter uses): loopback,
  private (10/8, 172.16/12, 192.168/16), link-local, documentation (192.0.2/24, 2001:db8::/32)
  and reserved ranges name no one. IPv6 additionally has to lie in 2000::/3 (the only
  allocated global-unicast block) and show at least three non-empty groups, so that slices
  like `a[256::]` are not taken for addresses. Also left alone: multicast addresses, network
  ranges (93.184.0.0/16), numbers after "version"/"release"/"==", parts of longer dotted
  numbers (OIDs like 1.3.6.1.4.1), and dotted quads whose first three numbers are single
  digits (1.2.3.4, 8.8.8.8, 2.7.0.40): in source code these are placeholders, public
  resolvers, versions and section numbers, and almost never a person's address.
* Phone numbers must carry separators: a bare digit run in code is far more often a constant
  than a phone number. North American numbers need "-" or "." between the groups, or the
  area code in parentheses ("(415) 555-2671"); space-only groups ("415 555 2671") look like
  lists of numbers in code and are only taken with a "+" country code. Seven-digit local
  numbers (555-1234) are not detected.
* Hex digests and other random-looking constants are not secrets unless assigned to a
  secret-sounding name: a sha256 in a test is not a credential.
* ENTROPY_BITS = 3.0 bits/char for assigned values (detect-secrets uses 3.0 for hex and 4.5
  for base64 strings with no name context; the name is our context, so we take the lower
  bar). "hunter2hunter2" scores 2.8 and stays; "Xk9#mP2$vL" scores 3.3 and is masked. Values
  that look like placeholders ("<password>", "${TOKEN}", "changeme", "your-api-key") stay.

mode="drop" returns (None, counts) when anything was found, so the pipeline can remove the
document instead of masking it. On the stdlib corpus (1,786 files) this masks 779 items:
620 emails (authors' headers, email-package tests), 146 IPs (mostly ipaddress/socket tests),
11 URL passwords and 2 phone numbers. tests/test_pii.py pins the bound for ordinary modules.

Written by hand: datatrove's PIIFormatter covers emails and IPv4 only and reports no counts;
credential scanners (detect-secrets, trufflehog) are repository-scanning tools outside our
dependencies, not text maskers a pipeline step can call.
"""

from __future__ import annotations

import bisect
import ipaddress
import math
import re
from collections import Counter

from candorlm.errors import CandorError

ENTROPY_BITS = 3.0
MIN_SECRET_LEN = 8
TYPES = ("email", "ip_address", "phone", "credit_card", "secret")
PLACEHOLDER = {t: f"<{t.upper()}>" for t in TYPES}

# Speed: Python's regex engine only scans fast for a literal or a plain character class at
# the start of a pattern, and a leading lookbehind or (?i) cuts it to 15-50 MB/s. So each
# detector first finds a cheap anchor (a literal, a lowercase keyword, a digit run) and then
# runs its full pattern only there. All detectors read the original text and return spans;
# masking happens once at the end. ~20 MB/s on the stdlib corpus (vs 2.7 MB/s for the same
# patterns run one after another over the whole text).

_PEM_RE = re.compile(
    r"-----BEGIN[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----.*?-----END[A-Z0-9 ]*PRIVATE KEY( BLOCK)?-----",
    re.S,
)
# Fixed-prefix tokens, each with the literal that anchors it: AWS IAM key ids, GitHub token
# formats, Slack tokens and webhooks, Google API keys and OAuth access tokens, Stripe live
# keys, JSON Web Tokens.
_AWS_ID = re.compile(r"A(?:KIA|SIA|BIA|CCA|GPA|IDA|ROA|NPA)[0-9A-Z]{16}")
_TOKENS = [(lit, _AWS_ID) for lit in ("AKIA", "ASIA", "ABIA", "ACCA", "AGPA", "AIDA", "AROA", "ANPA")] + [
    ("gh", re.compile(r"gh[pousr]_[A-Za-z0-9]{36,255}")),
    ("github_pat_", re.compile(r"github_pat_[A-Za-z0-9_]{60,255}")),
    ("xox", re.compile(r"xox[abposre]-[A-Za-z0-9-]{10,250}")),
    ("hooks.slack.com", re.compile(r"https://hooks\.slack\.com/services/[A-Za-z0-9/]{20,}")),
    ("AIza", re.compile(r"AIza[0-9A-Za-z_-]{35}")),
    ("ya29.", re.compile(r"ya29\.[0-9A-Za-z_-]{20,}")),
    ("k_live_", re.compile(r"[sr]k_live_[0-9A-Za-z]{20,}")),
    ("eyJ", re.compile(r"eyJ[A-Za-z0-9_-]{8,}\.eyJ[A-Za-z0-9_-]{8,}\.[A-Za-z0-9_-]{8,}")),
]
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")

# Keyword-led detectors run on the lowercased text (same length, same offsets) and mask group 1.
_AWS_SECRET_RE = re.compile(
    r"aws[\w.-]{0,20}?(?:secret|private)[\w.-]{0,20}[\"']?\s*(?:=|:|=>)\s*[\"']?([a-z0-9/+]{40})(?![a-z0-9/+=])"
)
_AUTH_TAIL = re.compile(r"[\"']?\s*[:=,]\s*[\"']?(?:bearer|token|basic|digest)\s+([a-z0-9._~+/-]{8,}=*)")
_BEARER_TAIL = re.compile(r"\s+([a-z0-9._~+/-]{16,}=*)")
_URL_CRED_TAIL = re.compile(r"[^/\s:@\"'<>]+:([^/\s@\"'<>]+)@")
_KEYWORD_RE = re.compile(
    r"pass(?:word|wd|phrase)|pwd|secret|token|api[_-]?key|apikey|access[_-]?key"
    r"|auth[_-]?key|private[_-]?key|credential"
)
# The name may end in the keyword or in one of a few suffixes (`secret_key`, `api_keys`) but
# not in others: `token_type = 'bare-quoted-string'` names a kind of token, not a credential.
_ASSIGN_TAIL = re.compile(
    r"(?:[_-]?(?:key|value|str|string))?s?(?![\w-])[\"']?\s*(?::=|=>|==?|:)\s*"
    r"(?:[bru]?[\"']([^\"'\s\\]{8,256})[\"']|([^\s\"'<>{}()\[\],;`]{8,256}))"
)
_PLACEHOLDER_RE = re.compile(
    r"(?i)^[<${%]|[>}]$|your|here|example|changeme|placeholder|dummy|redacted|xxxx|\*\*\*|\.\.\."
)
# Unquoted values that read as code: dotted or snake_case names, or a word with a number
# (`token2`). A bare random string like Zq8vT3rW9pLm is not one of them.
_CODE_NAME_RE = re.compile(r"[A-Za-z_]\w*[._][\w.]*|[A-Za-z]+\d*")
_DIGIT_RE = re.compile(r"\d")

_LOCAL_PART = re.compile(r"[\w+%-]+(?:\.[\w+%-]+)*\Z")
_DOMAIN = re.compile(r"((?:[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.)+[A-Za-z]{2,24})(?![\w-])")
_EMAIL_LOCAL_CHARS = frozenset("+%-_") | _ALNUM

# Cards, phones and IPv4 addresses all lie inside a run of digits and separators.
_NUMERIC_RUN = re.compile(r"\d[\d .()-]{5,}\d")
_CARD_RE = re.compile(
    r"(?<![\w.+-])(?:\d{13,19}|\d{4}([ -])\d{4}\1\d{4}\1\d{1,4}(?:\1\d{1,3})?|\d{4}([ -])\d{6}\2\d{4,5})"
    r"(?![\w]|[.-]\d)"
)
_PHONE_RE = re.compile(
    r"(?<![\w+.-])(?:"
    r"(?:\+?1[ .-]?)?(?:\([2-9]\d\d\) ?\d{3}[ .-]|[2-9]\d\d([.-])\d{3}\1)\d{4}"
    r"|\+\d{1,3}[ .-]?(?:\(\d{1,4}\)[ .-]?)?\d{1,4}(?:[ .-]\d{2,4}){1,4}"
    r")(?![\w]|[.-]\d)"
)
_IPV4_RE = re.compile(
    r"(?<![\w.])(?:(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)\.){3}(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
    r"(?![\w]|\.\d)"
)
_VERSION_CTX_RE = re.compile(r"(?i)(?:version|release|ver|rev)\W{0,3}$|[=<>~!]=\s*$")
_IPV6_ANCHOR = re.compile(r"[23][0-9A-Fa-f]{0,3}:[0-9A-Fa-f]{0,4}:")
_IPV6_RE = re.compile(r"(?<![\w:.])[23][0-9A-Fa-f]{0,3}(?::[0-9A-Fa-f]{0,4}){2,7}(?![\w:])")
_IPV6_GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")

# Issuer identification number prefixes (ISO/IEC 7812) for Visa, Mastercard, Amex, Discover,
# Diners, JCB, UnionPay and Maestro: a random Luhn-valid digit run rarely starts with one.
_CARD_PREFIX_RE = re.compile(
    r"4|5[1-5]|2(?:22[1-9]|2[3-9]\d|[3-6]\d\d|7[01]\d|720)|3[47]|6011|64[4-9]|65|30[0-5]|3[689]"
    r"|35(?:2[89]|[3-8]\d)|62|50(?:18|20|38)|5893|6304|67(?:59|6[123])"
)
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def shannon_entropy(s: str) -> float:
    """Bits per character of `s`'s character distribution (0 for an empty string)."""
    n = len(s)
    return -sum(c / n * math.log2(c / n) for c in Counter(s).values()) if n else 0.0


def luhn_ok(digits: str) -> bool:
    total = 0
    for i, ch in enumerate(reversed(digits)):
        d = ord(ch) - 48
        if i % 2:
            d = d * 2 - 9 if d > 4 else d * 2
        total += d
    return total % 10 == 0


def _looks_secret(value: str, quoted: bool) -> bool:
    if len(value) < MIN_SECRET_LEN or _PLACEHOLDER_RE.search(value):
        return False
    if not quoted and (not _DIGIT_RE.search(value) or _CODE_NAME_RE.fullmatch(value)):
        return False  # `token = tokens.next_token`, `key = sha256_key` are code, not credentials
    return shannon_entropy(value) >= ENTROPY_BITS


def _is_example_domain(domain: str) -> bool:
    d = domain.lower()
    return d.endswith((".example", ".test", ".invalid", ".localhost")) or any(
        d == e or d.endswith("." + e) for e in ("example.com", "example.net", "example.org")
    )


def _is_card(s: str) -> bool:
    digits = s.replace(" ", "").replace("-", "")
    return 13 <= len(digits) <= 19 and bool(_CARD_PREFIX_RE.match(digits)) and luhn_ok(digits)


def _is_phone(s: str) -> bool:
    n = sum(ch.isdigit() for ch in s)
    return 10 <= n <= 15 if s.startswith("+") else n in (10, 11)


def _is_public_ipv4(m: re.Match) -> bool:
    s, end = m.string, m.end()
    if m.group()[1:6:2] == "...":  # first three parts single digits: 1.2.3.4, 8.8.8.8, 2.7.0.40
        return False
    if s.startswith("/", end) and end + 1 < len(s) and s[end + 1].isdigit():
        return False  # a network range (10.1.0.0/16), not a host
    if _VERSION_CTX_RE.search(s, max(0, m.start() - 12), m.start()):
        return False
    ip = ipaddress.IPv4Address(m.group())
    return ip.is_global and not ip.is_multicast


def _is_public_ipv6(s: str) -> bool:
    if sum(1 for g in s.split(":") if g) < 3:
        return False
    try:
        ip = ipaddress.IPv6Address(s)
    except ValueError:
        return False
    return ip in _IPV6_GLOBAL_UNICAST and ip.is_global


def _positions(hay: str, needle: str):
    i = hay.find(needle)
    while i >= 0:
        yield i
        i = hay.find(needle, i + 1)


def _secret_spans(text: str, low: str) -> list[tuple[int, int]]:
    spans = []
    if "private key" in low:
        spans += [m.span() for m in _PEM_RE.finditer(text)]
    for lit, regex in _TOKENS:
        for i in _positions(text, lit) if lit in text else ():
            m = regex.match(text, i)
            if m and (i == 0 or text[i - 1] not in _ALNUM) and (m.end() == len(text) or text[m.end()] not in _ALNUM):
                spans.append(m.span())
    if "aws" in low:
        spans += [m.span(1) for m in _AWS_SECRET_RE.finditer(low)]
    for i in _positions(low, "authorization"):
        m = _AUTH_TAIL.match(low, i + 13)
        if m:
            spans.append(m.span(1))
    for i in _positions(low, "bearer"):
        m = _BEARER_TAIL.match(low, i + 6)
        if m and (i == 0 or low[i - 1] not in _ALNUM) and shannon_entropy(text[m.start(1) : m.end(1)]) >= ENTROPY_BITS:
            spans.append(m.span(1))
    for i in _positions(text, "://") if "@" in text else ():
        m = _URL_CRED_TAIL.match(text, i + 3)
        if m and not _PLACEHOLDER_RE.search(m.group(1)):
            spans.append(m.span(1))
    for k in _KEYWORD_RE.finditer(low):
        m = _ASSIGN_TAIL.match(text, k.end())
        if m:
            g = 1 if m.group(1) is not None else 2
            if _looks_secret(m.group(g), quoted=g == 1):
                spans.append(m.span(g))
    return spans


def _email_spans(text: str) -> list[tuple[int, int]]:
    spans = []
    for i in _positions(text, "@"):
        if i == 0 or text[i - 1] not in _EMAIL_LOCAL_CHARS and not text[i - 1].isalnum():
            continue
        local = _LOCAL_PART.search(text, max(0, i - 64), i)
        domain = _DOMAIN.match(text, i + 1)
        if local and domain and not _is_example_domain(domain.group(1)):
            spans.append((local.start(), domain.end()))
    return spans


def _numeric_spans(text: str) -> list[tuple[int, int, str]]:
    spans = []
    for run in _NUMERIC_RUN.finditer(text):
        # A match lies inside the run (a phone's '+' just before it); two more characters of
        # end position let the trailing lookaheads see past the run.
        lo, hi = max(0, run.start() - 1), min(len(text), run.end() + 2)
        for regex, kind, ok in (
            (_CARD_RE, "credit_card", lambda m: _is_card(m.group())),
            (_PHONE_RE, "phone", lambda m: _is_phone(m.group())),
            (_IPV4_RE, "ip_address", _is_public_ipv4),
        ):
            spans += [(*m.span(), kind) for m in regex.finditer(text, lo, hi) if ok(m)]
    return spans


def find(text: str) -> list[tuple[int, int, str]]:
    """Non-overlapping (start, end, type) spans to mask, in text order. Where detectors
    overlap, the earlier type in this order wins: secret, email, credit_card, phone, ip."""
    low = text.lower()
    if len(low) != len(text):  # a few characters (e.g. U+0130) lowercase to two
        low = text.translate(_ASCII_LOWER)
    found = [(a, b, "secret") for a, b in _secret_spans(text, low)]
    found += [(a, b, "email") for a, b in _email_spans(text)]
    numeric = _numeric_spans(text)
    found += [s for s in numeric if s[2] == "credit_card"] + [s for s in numeric if s[2] == "phone"]
    found += [s for s in numeric if s[2] == "ip_address"]
    for a in _IPV6_ANCHOR.finditer(text):
        m = _IPV6_RE.match(text, a.start())
        if m and _is_public_ipv6(m.group()):
            found.append((*m.span(), "ip_address"))
    # Keep a span unless it overlaps one already kept (kept spans stay sorted and disjoint, so
    # only the two neighbours need checking: a mailing-list dump can hold 10^4 addresses).
    starts: list[int] = []
    kept: list[tuple[int, int, str]] = []
    for a, b, kind in found:
        j = bisect.bisect_left(starts, a)
        if b <= a or (j < len(kept) and kept[j][0] < b) or (j and kept[j - 1][1] > a):
            continue
        starts.insert(j, a)
        kept.insert(j, (a, b, kind))
    return kept


def scrub(text: str, mode: str = "mask") -> tuple[str | None, dict[str, int]]:
    """Mask PII and secrets in `text`. Returns (masked text, {type: count}) where the dict
    holds only the types found (empty when the text is clean). mode="drop" returns None
    instead of the text when anything was found; the counts are those of mode="mask"."""
    if mode not in ("mask", "drop"):
        raise CandorError(f"unknown PII mode {mode!r}; use 'mask' or 'drop'")
    spans = find(text)
    counts: dict[str, int] = {}
    for _, _, kind in spans:
        counts[kind] = counts.get(kind, 0) + 1
    if not spans:
        return text, counts
    if mode == "drop":
        return None, counts
    out, pos = [], 0
    for a, b, kind in spans:
        out += [text[pos:a], PLACEHOLDER[kind]]
        pos = b
    out.append(text[pos:])
    return "".join(out), counts
