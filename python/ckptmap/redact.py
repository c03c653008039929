"""Secrets never reach messages: passwords and presigned-URL signatures are masked.

`redact_url` is the one function that formats a URL for people: every exception, log line and
progress bar that shows a URL passes it through here. It masks

- the password of ``user:password@host`` (and a bare ``token@host``, which is how tokens are
  often passed as a user name);
- the values of query (and fragment) parameters that carry credentials: anything whose name
  contains ``sig``, ``token``, ``cred``, ``secret``, ``pass``, ``pwd``, ``auth``, ``key``,
  ``session`` or ``policy`` (case-insensitive), which covers S3's ``X-Amz-Signature``,
  ``X-Amz-Credential``, ``X-Amz-Security-Token``, ``AWSAccessKeyId`` and ``Signature``,
  Azure's ``sig``, GCS's ``X-Goog-Signature``, CloudFront's ``Key-Pair-Id`` and plain
  ``token=`` / ``access_token=`` / ``api_key=``.

`redact_text` does the same for every URL inside a longer text (an error message from a
library that quotes the URL it was given). Both are pure functions of their input.
"""

from __future__ import annotations

import re
from urllib.parse import urlsplit, urlunsplit

__all__ = ["MASK", "redact_text", "redact_url"]

#: What a secret is replaced with.
MASK = "***"

_SECRET_PARAM = re.compile(r"sig|token|cred|secret|pass|pwd|auth|key|session|policy", re.IGNORECASE)
# A URL inside text: a scheme, "://", then anything up to whitespace or a quote/bracket.
_URL_IN_TEXT = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*://[^\s'\"<>`]+")
# Fallback for strings urlsplit refuses: user:password@ and secret-looking parameters.
_USERINFO = re.compile(r"(?<=://)[^/@\s]*@")
_PARAM = re.compile(r"(?P<name>[^?&#;=\s]+)=(?P<value>[^&#;\s]*)")


def _redact_params(text: str) -> str:
    def mask(match: re.Match[str]) -> str:
        if _SECRET_PARAM.search(match["name"]) and match["value"]:
            return f"{match['name']}={MASK}"
        return match[0]

    return _PARAM.sub(mask, text)


def _redact_netloc(netloc: str) -> str:
    userinfo, at, host = netloc.rpartition("@")
    if not at:
        return netloc
    user, colon, _password = userinfo.partition(":")
    if colon:
        return f"{user}:{MASK}@{host}"
    return f"{MASK}@{host}"


def redact_url(url: object) -> str:
    """`url` as text with its password and credential parameters masked (see the module).

    Anything that is not a str is formatted with `str` first; a string that is not a URL
    comes back unchanged unless it holds something that looks like a credential parameter.
    """
    text = url if isinstance(url, str) else str(url)
    if "://" not in text and "@" not in text and "=" not in text:
        return text
    try:
        parts = urlsplit(text)
    except ValueError:  # e.g. a malformed IPv6 host: mask what can be recognised
        return _redact_params(_USERINFO.sub(f"{MASK}@", text))
    netloc = _redact_netloc(parts.netloc)
    query = _redact_params(parts.query)
    fragment = _redact_params(parts.fragment)
    if (netloc, query, fragment) == (parts.netloc, parts.query, parts.fragment):
        return text  # nothing secret: keep the caller's exact spelling
    return urlunsplit((parts.scheme, netloc, parts.path, query, fragment))


def redact_text(text: object) -> str:
    """`text` with every URL in it passed through `redact_url`."""
    message = text if isinstance(text, str) else str(text)
    if "://" not in message:
        return message

    def one(match: re.Match[str]) -> str:
        # Punctuation that ends a sentence is not part of the URL.
        url = match[0].rstrip(".,:;!?)]}")
        return redact_url(url) + match[0][len(url) :]

    return _URL_IN_TEXT.sub(one, message)
