"""infra.urlnorm: the URL Standard's results on known inputs, and properties over generated URLs."""

from __future__ import annotations

import http.client

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from infra.urlnorm import UrlNormalizationError, normalize_url

# (input, what the URL Standard's parser gives, as a browser's `new URL(input).href`); None: a parse failure.
KNOWN = [
    ("  http://EXAMPLE.com/a b?c d#e f  ", "http://example.com/a%20b?c%20d#e%20f"),
    ("http://example.com/ü/é.jpg", "http://example.com/%C3%BC/%C3%A9.jpg"),
    ("http://faß.de/", "http://xn--fa-hia.de/"),  # UTS #46 non-transitional: ß is kept
    ("http://☃.net/", "http://xn--n3h.net/"),
    ("http://Bücher.example:80/x", "http://xn--bcher-kva.example/x"),
    ("http://0x7f.1/", "http://127.0.0.1/"),
    ("http://2130706433/", "http://127.0.0.1/"),
    ("http://0251.0376.0251.0376/", "http://169.254.169.254/"),
    ("http://%31%32%37.0.0.1/", "http://127.0.0.1/"),
    ("http://１２７.０.０.１/", "http://127.0.0.1/"),  # fullwidth digits map to ASCII before the IPv4 parser
    ("http://[::FFFF:169.254.169.254]/", "http://[::ffff:a9fe:a9fe]/"),
    ("http://[0:0:0:0:0:0:0:1]:8080/", "http://[::1]:8080/"),
    ("http://[1:0:0:2:0:0:0:3]/", "http://[1:0:0:2::3]/"),
    ("http:\\\\\\example.com\\a\\..\\b", "http://example.com/b"),
    ("http:example.com", "http://example.com/"),
    ("https://user:p@ss@host/x", "https://user:p%40ss@host/x"),
    ("HTTP://h/a/./b/../c/%2e%2E/d", "http://h/a/d"),
    ("http://h/?q='x'\\y", "http://h/?q=%27x%27\\y"),
    ("http://h/\t\na\rb", "http://h/ab"),
    ("https://h:443/", "https://h/"),
    ("http://h/%zz%41", "http://h/%zz%41"),  # escapes are kept as written, invalid ones too
    ("file:///tmp/a b/ü.png", "file:///tmp/a%20b/%C3%BC.png"),
    ("file://localhost/tmp/x", "file:///tmp/x"),
    ("javascript:alert(1)", "javascript:alert(1)"),
    ("http://1.2.3.4.5/", None), ("http://1.2.3.09/", None), ("http://[::1%25eth0]/", None), ("http://[bad", None),
    ("http://exa mple.com/", None), ("http://h:99999/", None), ("http://h:8x/", None), ("", None), ("/relative", None),
    ("http://user@/x", None), ("http:///", None), ("http://a\ufffdb/", None), ("http://xn--/", None),
    ("http://256.0.0.1/", None), ("http://0x100000000/", None), ("http://foo.0x/", None), ("http://foo.09/", None),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), KNOWN)
def test_known_urls(text, expected):
    if expected is None:
        with pytest.raises(UrlNormalizationError):
            normalize_url(text)
    else:
        assert normalize_url(text) == expected


def test_not_a_string_is_malformed():
    with pytest.raises(UrlNormalizationError):
        normalize_url(None)  # type: ignore[arg-type]
    assert issubclass(UrlNormalizationError, ValueError)


_TEXT = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), max_size=12)
_HOSTS = st.sampled_from(["example.com", "EXAMPLE.com", "bücher.de", "faß.de", "日本.jp", "a_b.example", "10.0.0.1",
                          "0x7f.1", "[::1]", "[::ffff:1.2.3.4]", "xn--n3h.net", "%65xample.com", "ex%20ample.com"])


@st.composite
def urls(draw: st.DrawFn) -> str:
    scheme = draw(st.sampled_from(["http", "HTTPS", "hTtP", "file", "javascript", "ftp"]))
    user = draw(st.sampled_from(["", "u@", "u:p@", "ü:ß@"]))
    port = draw(st.sampled_from(["", ":80", ":8080", ":443", ":65536", ":x"]))
    host = draw(_HOSTS)
    ws = draw(st.sampled_from(["", " ", "\t", "\x01", "\n "]))
    return f"{ws}{scheme}://{user}{host}{port}/{draw(_TEXT)}?{draw(_TEXT)}#{draw(_TEXT)}{ws}"


@settings(max_examples=400, derandomize=True, database=None, deadline=None)
@given(text=st.one_of(urls(), _TEXT))
def test_normalised_urls_are_fixed_points_and_can_be_sent(text):
    """Normalising twice changes nothing; the result is ASCII with no whitespace or control character, so
    http.client can send it (a raw UTF-8 path failed there with UnicodeEncodeError)."""
    try:
        once = normalize_url(text)
    except UrlNormalizationError:
        return
    assert normalize_url(once) == once
    assert once.isascii() and not any(c.isspace() or ord(c) < 32 or ord(c) == 127 for c in once), once
    if once.startswith(("http://", "https://")):
        conn = http.client.HTTPConnection("h")
        conn.putrequest("GET", once.split("#")[0], skip_host=True)  # raises on what cannot go on the wire
        conn.close()
