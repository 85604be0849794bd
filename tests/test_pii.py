"""PII scrubbing: planted items of every type are masked and counted; look-alikes are not."""

import argparse
import collections
import inspect
import json
import os
import subprocess
import time
import typing

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from candorlm.data import pii
from candorlm.errors import CandorError

PLANTED = [
    ("email", "write to jane.doe+news@acme-corp.io today", "jane.doe+news@acme-corp.io"),
    ("ip_address", "server at 93.184.216.34:443", "93.184.216.34"),
    ("ip_address", "v6 host 2606:4700:4700::1111 answers", "2606:4700:4700::1111"),
    ("phone", "call (415) 555-2671 now", "(415) 555-2671"),
    ("phone", "call 555-123-4567 now", "555-123-4567"),
    ("phone", "ring +44 20 7946 0958 please", "+44 20 7946 0958"),
    ("credit_card", "visa 4111 1111 1111 1111 exp", "4111 1111 1111 1111"),
    ("credit_card", "amex 3782-822463-10005 exp", "3782-822463-10005"),
    ("credit_card", "mc 5500000000000004 exp", "5500000000000004"),
    ("secret", "key AKIAIOSFODNN7EXAMPLE here", "AKIAIOSFODNN7EXAMPLE"),
    ("secret", 'aws_secret_access_key = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"',
     "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"),
    ("secret", "token ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789 ok", "ghp_aBcDeFgHiJkLmNoPqRsTuVwXyZ0123456789"),
    ("secret", "slack xoxb-123456789012-abcdefghijklmno ok", "xoxb-123456789012-abcdefghijklmno"),
    ("secret", "maps AIzaSyA-1234567890abcdefghijklmnopqrstu ok", "AIzaSyA-1234567890abcdefghijklmnopqrstu"),
    ("secret", "Authorization: Bearer Zk3x9QpL2mN7vR4tY8wA1s", "Zk3x9QpL2mN7vR4tY8wA1s"),
    ("secret", 'password = "Xk9#mP2$vL7q"', "Xk9#mP2$vL7q"),
    ("secret", "DB_PASSWORD=Zq8vT3rW9pLm", "Zq8vT3rW9pLm"),
    ("secret", "db = 'postgres://admin:s3cr3tPw@db.internal/app'", "s3cr3tPw"),
    ("secret", "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----",
     "MIIEpAIBAAKCAQEA7"),
]


@pytest.mark.parametrize("kind,text,item", PLANTED)
def test_planted_item_is_masked_and_counted(kind, text, item):
    out, counts = pii.scrub(text)
    assert counts == {kind: 1}
    assert item not in out and pii.PLACEHOLDER[kind] in out


def test_all_types_in_one_document():
    doc = "\n".join(text for _, text, _ in PLANTED)
    out, counts = pii.scrub(doc)
    expected = collections.Counter(kind for kind, _, _ in PLANTED)
    assert counts == dict(expected)
    assert all(item not in out for _, _, item in PLANTED)
    assert pii.scrub(out) == (out, {})  # placeholders are not found again


@pytest.mark.parametrize("text", [
    "card 4111 1111 1111 1112",  # Luhn check fails
    "card 4111111111111112",
    "id 1234567812345670",  # Luhn-valid but no card network starts with 12
    "n = 0x4111111111111111",
    "x = 4111111111111111.5",
])
def test_luhn_invalid_or_non_card_numbers_are_kept(text):
    assert pii.scrub(text) == (text, {})


@pytest.mark.parametrize("text", [
    "see user@example.com or bob@mail.example.org or a@host.test",  # reserved example domains
    "local 127.0.0.1, 10.0.0.5, 192.168.1.1, 172.16.0.3, 100.64.1.1, 224.0.0.1",
    "docs 192.0.2.1 203.0.113.9 2001:db8::1 fe80::1 ::1",
    "version 1.2.3.4, dns 8.8.8.8, spec 8.2.4.45, oid 1.3.6.1.4.1.311, net 93.184.0.0/16",
    "slices a[256::], b[2000:3000], c[1::2]",
    "phone-like 123 456 7890 and dates 2020-01-15, times 12:30:45",
    "@property\ndef f(self): return a@b",
    'api_key: "changeme"; token = "hunter2hunter2"; password = "<password>"',
    "token_type = 'bare-quoted-string'; secret = secrets.token_bytes(16)",
    "sha256 = 'e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855'",
])
def test_look_alikes_are_kept(text):
    assert pii.scrub(text) == (text, {})


def test_drop_mode():
    assert pii.scrub("mail me: jane@acme.io", mode="drop") == (None, {"email": 1})
    assert pii.scrub("nothing here", mode="drop") == ("nothing here", {})
    with pytest.raises(CandorError):
        pii.scrub("x", mode="delete")


def test_stdlib_source_has_few_false_positives():
    # Measured: 7 findings in these 7 modules, all of them authors' emails in headers (which
    # are personal, so masking them is intended); no IPs, phones, cards or secrets.
    counts = collections.Counter()
    for mod in (json, argparse, collections, os, subprocess, typing, inspect):
        counts.update(pii.scrub(inspect.getsource(mod))[1])
    assert set(counts) <= {"email"}
    assert counts["email"] <= 7


def test_entropy_and_luhn_helpers():
    assert pii.shannon_entropy("") == 0 and pii.shannon_entropy("aaaa") == 0
    assert pii.shannon_entropy("abcd") == pytest.approx(2.0)
    assert pii.luhn_ok("79927398713") and not pii.luhn_ok("79927398710")


def test_throughput_is_not_catastrophic():
    text = "\n".join(inspect.getsource(m) for m in (argparse, subprocess, typing, inspect)) * 3
    t0 = time.perf_counter()
    pii.scrub(text)
    mb_per_s = len(text) / 1e6 / (time.perf_counter() - t0)
    assert mb_per_s > 1.0  # measured ~15 MB/s; the pipeline needs 5


def test_many_findings_in_one_document():
    doc = "\n".join(f"From: user{i}@lists.acme.io (call 415-555-{i % 10000:04d})" for i in range(20000))
    t0 = time.perf_counter()
    out, counts = pii.scrub(doc)
    assert counts == {"email": 20000, "phone": 20000}
    # measured 0.85 s on a loaded 2-core machine; overlap checks must not be quadratic
    assert time.perf_counter() - t0 < 10


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.sampled_from("ab1@.:-_ /'\"=\n+()x9AKIAghp"), max_size=200))
def test_random_text_counts_match_placeholders(text):
    out, counts = pii.scrub(text)
    if not counts:
        assert out == text
    for kind, placeholder in pii.PLACEHOLDER.items():
        assert out.count(placeholder) == counts.get(kind, 0)
