"""Make the feedback pages safe to open in an instructor's browser.

``nbgrader generate_feedback`` writes ``feedback/<student>/<assignment>/<notebook>.html``, and
instructors open those pages in a browser that is logged into the course server. nbgrader's
``feedback`` template renders a student's markdown cells with ``markdown2html`` and nothing else:
it overrides the block where nbconvert's own template honours ``HTMLExporter.sanitize_html``, so
``<script>``, ``<img onerror>``, ``<iframe>``, ``<base>``, ``<form>``, ``<meta http-equiv=refresh>``
and ``[x](javascript:...)`` from a student reached the page as live markup. Three layers here:

1. :func:`feedback_exporter` -- the exporter ``nbgrader_settings.configure`` gives
   GenerateFeedback: nbconvert's HTMLExporter whose ``markdown2html`` also sanitises (an allowlist,
   applied by bleach, which parses the way browsers do), so honest pages keep their formatting
   and hostile markup shows up as escaped text.
2. :func:`secure_feedback` -- run after ``generate_feedback``: every feedback page gets a strict
   Content-Security-Policy as the first element of ``<head>`` (MathJax from cdnjs is the only script
   source; the template's eval-based MathJax configuration becomes a hash-pinned inline script).
3. :func:`find_dangerous` -- an independent check of the finished page; a page where any dangerous
   construct survived is replaced by :func:`fallback_page` (its text, escaped, inside ``<pre>``).

Only the standard library is imported at module level: GPU graders run the tests without Jupyter.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import html
import os
import re
from html.parser import HTMLParser
from pathlib import Path

# -- what nbgrader's feedback template loads --------------------------------------------------------
# The template (nbgrader/server_extensions/formgrader/templates/feedback/index.html.j2) replaces
# nbconvert's <head>: no jQuery, no require.js, no widgets; bootstrap and its own CSS inline in
# <style>; and nbconvert's mathjax() macro: <script src=".../mathjax/2.7.7/latest.js?config=...">
# plus a <script type="text/x-mathjax-config"> block. latest.js asks api.cdnjs.com (then
# api.github.com) for the newest 2.x, loads MathJax.js and its extensions and web fonts from the same
# cdnjs directory, and MathJax styles its output with inline <style> elements and style attributes.
MATHJAX_BASE = "https://cdnjs.cloudflare.com/ajax/libs/mathjax/"
MATHJAX_VERSION_APIS = ("https://api.cdnjs.com", "https://api.github.com")

# MathJax 2 runs text/x-mathjax-config blocks with eval(), which would need 'unsafe-eval' (and would
# eval any such block a student smuggled in). The same settings as an author configuration object,
# read by MathJax.js at startup, need no eval; the CSP allows this one inline script by its hash.
MATHJAX_CONFIG = (
    "window.MathJax = {"
    "TeX: {equationNumbers: {autoNumber: \"AMS\", useLabelIds: true}}, "
    "tex2jax: {inlineMath: [[\"$\", \"$\"], [\"\\\\(\", \"\\\\)\"]], "
    "displayMath: [[\"$$\", \"$$\"], [\"\\\\[\", \"\\\\]\"]], "
    "processEscapes: true, processEnvironments: true}, "
    "displayAlign: \"center\", messageStyle: \"none\", "
    "CommonHTML: {linebreaks: {automatic: true}}};"
)


def _sha256(text: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(text.encode()).digest()).decode() + "'"


CSP = "; ".join([
    "default-src 'none'",
    f"script-src {MATHJAX_BASE} {_sha256(MATHJAX_CONFIG)}",
    # bootstrap, nbconvert's and nbgrader's CSS are inline <style>; MathJax sets style attributes
    "style-src 'unsafe-inline'",
    f"font-src {MATHJAX_BASE}",
    "img-src data:",                       # plots and attachments are embedded; nothing is fetched
    "connect-src " + " ".join(MATHJAX_VERSION_APIS),
    "object-src 'none'",
    "frame-src 'none'",
    "base-uri 'none'",
    "form-action 'none'",
])
CSP_META = f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'

FALLBACK_MARKER = "autograder-feedback-fallback"
_FALLBACK_STYLE = "pre { white-space: pre-wrap; }"
FALLBACK_CSP = "; ".join([
    "default-src 'none'", f"style-src {_sha256(_FALLBACK_STYLE)}", "object-src 'none'",
    "base-uri 'none'", "form-action 'none'",
])
_FALLBACK_CSP_META = f'<meta http-equiv="Content-Security-Policy" content="{FALLBACK_CSP}">'

# -- the allowlists shared by the sanitiser and the checker -----------------------------------------
# What nbconvert's classic template, nbgrader's feedback template and sanitised markdown produce in
# <body>. Everything else is refused: raw-text elements (style, textarea, noscript, xmp, title...),
# foreign content (svg, math) and forms are where browsers and Python's parser disagree.
MARKDOWN_TAGS = frozenset("""
    a abbr acronym b blockquote br caption cite code col colgroup dd del details dfn div dl dt em
    figcaption figure h1 h2 h3 h4 h5 h6 hr i img ins kbd li mark ol p pre q s samp small span strike
    strong sub summary sup table tbody td tfoot th thead tr tt u ul var
""".split())
BODY_TAGS = MARKDOWN_TAGS | {"main", "body", "html"}
HEAD_TAGS = frozenset({"html", "head", "meta", "title", "style", "script", "body"})
MARKDOWN_ATTRIBUTES = {
    "*": {"class", "id", "title"},
    "a": {"href", "name"},
    "img": {"src", "alt", "width", "height"},
    "td": {"colspan", "rowspan", "align"},
    "th": {"colspan", "rowspan", "align"},
    "ol": {"start"},
    "details": {"open"},
}
_URL_ATTRIBUTES = frozenset({
    "href", "src", "action", "formaction", "xlink:href", "data", "poster", "background", "cite",
    "longdesc", "lowsrc", "dynsrc", "srcset", "ping", "manifest", "codebase", "classid", "archive",
    "icon", "profile", "usemap", "itemtype",
})
_SAFE_SCHEMES = frozenset({"http", "https", "mailto"})
_DATA_IMAGE = re.compile(r"data:image/(png|jpeg|gif|webp|bmp|svg\+xml)[;,]", re.I)
_BAD_CSS = re.compile(r"url\(|expression|javascript:|@import|behavior|-moz-binding|\\", re.I)


def _scheme(url: str) -> str | None:
    """The scheme a browser reads from ``url`` (after it drops controls, tabs and newlines)."""
    url = re.sub(r"[\t\n\r]", "", url.strip("".join(map(chr, range(0x21)))))
    m = re.match(r"([a-zA-Z][a-zA-Z0-9+.\-]*):", url)
    return m.group(1).lower() if m else None


def url_is_safe(tag: str, attribute: str, url: str) -> bool:
    """Relative links and http(s)/mailto anywhere; ``data:image/...`` only as an image's source."""
    urls = [u.strip().split(" ")[0] for u in url.split(",")] if attribute == "srcset" else [url]
    for u in urls:
        scheme = _scheme(u)
        if scheme is None or scheme in _SAFE_SCHEMES:
            continue
        if scheme == "data" and tag == "img" and attribute == "src" and _DATA_IMAGE.match(u.strip()):
            continue
        return False
    return True


# -- layer 1: sanitise rendered markdown ------------------------------------------------------------
def _markdown_attribute(tag: str, name: str, value: str) -> bool:
    if name not in MARKDOWN_ATTRIBUTES["*"] and name not in MARKDOWN_ATTRIBUTES.get(tag, ()):
        return False
    return name not in _URL_ATTRIBUTES or url_is_safe(tag, name, value)


def sanitize_markdown_html(fragment: str) -> str:
    """Rendered markdown with only :data:`MARKDOWN_TAGS` live; other tags become visible text.

    Unlike nbconvert's ``clean_html`` (bleach's tiny default list, which escapes <p>, <h1>, <img>
    and tables), this keeps what markdown produces. bleach (a dependency of nbconvert) parses with
    html5lib, as browsers do, and re-serialises, so no markup survives that a browser reads
    differently.
    """
    import bleach

    return bleach.clean(fragment, tags=MARKDOWN_TAGS, attributes=_markdown_attribute,
                        protocols=_SAFE_SCHEMES | {"data"}, strip=False, strip_comments=True)


#: Longest code-cell source a feedback page shows in full. Highlighting is the slow part of a
#: page: a 400 000-character line of attribute accesses (a corpus attack) took 80 s to export
#: and 10 s to check, and nothing else bounds it. The student keeps their notebook.
FEEDBACK_SOURCE_CHARS = 20_000


def clip_long_sources(nb, limit: int = FEEDBACK_SOURCE_CHARS):
    """``nb`` with every code cell's source longer than ``limit`` cut to its start and a note."""
    for cell in nb.cells:
        if cell.get("cell_type") == "code" and len(cell.source) > limit:
            cell.source = (cell.source[:limit // 10] + f"\n# [... {len(cell.source) - limit // 10} more "
                           "characters of this cell are not shown in the feedback page]\n")
    return nb


@functools.cache
def feedback_exporter() -> type:
    """HTMLExporter whose ``markdown2html`` sanitises when ``sanitize_html`` is set.

    nbgrader's feedback template calls ``markdown2html`` directly for markdown cells and instructors'
    comments, bypassing nbconvert's ``should_sanitize_html`` branch, so ``sanitize_html`` alone only
    reaches outputs and raw cells. Built on first use: nbconvert is not installed everywhere.
    """
    import jinja2
    from nbconvert.exporters import HTMLExporter
    from nbconvert.filters.markdown_mistune import InvalidNotebook

    class FeedbackHTMLExporter(HTMLExporter):
        def from_notebook_node(self, nb, resources=None, **kw):
            return super().from_notebook_node(clip_long_sources(nb), resources, **kw)

        @jinja2.pass_context
        def markdown2html(self, context, source):
            try:
                rendered = super().markdown2html(context, source)
            except InvalidNotebook as exc:
                # ![x](attachment:gone.png) without the attachment: nbconvert raises and nbgrader
                # then writes no feedback page at all for this student. Show the cell as text.
                rendered = f"<p><em>{html.escape(str(exc))}</em></p>\n<pre>{html.escape(source)}</pre>"
            return sanitize_markdown_html(rendered) if self.sanitize_html else rendered

    FeedbackHTMLExporter.__module__ = __name__
    FeedbackHTMLExporter.__qualname__ = "FeedbackHTMLExporter"
    return FeedbackHTMLExporter


# -- layer 3: the check -----------------------------------------------------------------------------
class _Scanner(HTMLParser):
    """Walks a finished page and records every construct that could run script or leave the page.

    Before the first ``<body>`` tag (the template's own head) only the known MathJax scripts and
    the CSP meta may appear; in the body only :data:`BODY_TAGS`, and no comments, declarations,
    processing instructions or unparsed ``<``: those are exactly where Python's parser and a
    browser can disagree about where markup starts and ends.
    """

    def __init__(self):
        super().__init__(convert_charrefs=False)
        self.findings: list[str] = []
        self.in_body = False
        self.charset_ok = False
        self._raw: tuple[str, list, list[str]] | None = None   # open <script>/<style>: tag, attrs, text

    def _find(self, what: str) -> None:
        if what not in self.findings:
            self.findings.append(what)

    def handle_starttag(self, tag, attrs):
        self._check_tag(tag, attrs)
        if tag in ("script", "style"):
            self._raw = (tag, attrs, [])

    def handle_startendtag(self, tag, attrs):
        self._check_tag(tag, attrs)
        if tag == "script":
            self._check_script(attrs, "")

    def handle_endtag(self, tag):
        if self._raw and tag == self._raw[0]:
            raw_tag, attrs, text = self._raw
            self._raw = None
            if raw_tag == "script":
                self._check_script(attrs, "".join(text))

    def handle_data(self, data):
        if self._raw is not None:
            self._raw[2].append(data)
        elif self.in_body and "<" in data:
            self._find("markup the parser could not read (a stray '<')")

    def handle_comment(self, data):
        if self.in_body:
            self._find("an HTML comment in the body")

    def handle_decl(self, decl):
        if self.in_body:
            self._find("a <!...> declaration in the body")

    def unknown_decl(self, data):
        if self.in_body:
            self._find("a <![...]> section in the body")

    def handle_pi(self, data):
        if self.in_body:
            self._find("a <?...> processing instruction in the body")

    def close(self):
        super().close()
        if self._raw is not None:
            self._find(f"an unclosed <{self._raw[0]}> element")
            if self._raw[0] == "script":
                self._check_script(self._raw[1], "".join(self._raw[2]))
        if not self.in_body:
            self._find("no <body>")
        elif not self.charset_ok:
            self._find("no <meta charset=\"utf-8\"> in <head>")

    def _check_script(self, attrs, text):
        src = dict(attrs).get("src") or ""
        known = (not self.in_body and
                 ((len(attrs) == 1 and attrs[0][0] == "src" and src.startswith(MATHJAX_BASE)
                   and not text.strip())
                  or (not attrs and text == MATHJAX_CONFIG)))
        if not known:
            self._find("a <script> element" + (f" (src={src!r})" if src else ""))

    def _check_tag(self, tag, attrs):
        if tag == "body":
            self.in_body = True
        allowed = BODY_TAGS if self.in_body else HEAD_TAGS
        if tag not in allowed and tag != "script":
            self._find(f"a <{tag}> element")
        if tag == "meta":
            self._check_meta(attrs)
        for name, value in attrs:
            value = value or ""
            if name.startswith("on"):
                self._find(f"an event-handler attribute {name}= on <{tag}>")
            elif name in ("srcdoc", "formaction", "action", "http-equiv") and tag != "meta":
                self._find(f"a {name}= attribute on <{tag}>")
            elif name in _URL_ATTRIBUTES and not url_is_safe(tag, name, value):
                self._find(f"a {_scheme(value) or 'disallowed'}: URL in {name}= on <{tag}>")
            elif name == "style" and _BAD_CSS.search(value):
                self._find(f"a style= attribute that loads or runs something on <{tag}>")

    def _check_meta(self, attrs):
        d = {k: (v or "") for k, v in attrs}
        if self.in_body:
            return   # already reported as a <meta> element in the body
        if "charset" in d:
            if d["charset"].strip().lower() in ("utf-8", "utf8"):
                self.charset_ok = True
            else:
                self._find(f"a <meta charset={d['charset']!r}>")
        if "http-equiv" in d:
            equiv, content = d["http-equiv"].strip().lower(), d.get("content", "")
            if equiv != "content-security-policy" or content not in (CSP, FALLBACK_CSP):
                self._find(f"a <meta http-equiv={d['http-equiv']!r}>")


def find_dangerous(page: str) -> list[str]:
    """What in ``page`` could run script, load something, or take the instructor elsewhere.

    Empty for a page that holds only the template's own scripts and safe markup.
    """
    scanner = _Scanner()
    scanner.feed(page)
    scanner.close()
    return scanner.findings


# -- layer 2: the CSP, and the fallback ---------------------------------------------------------------
_HEAD = re.compile(r"<head\b[^>]*>", re.I)
_BODY = re.compile(r"<body\b", re.I)
_MATHJAX_CONFIG_BLOCK = re.compile(r"<script\s+type=[\"']text/x-mathjax-config[\"']\s*>.*?</script\s*>\s*",
                                   re.I | re.S)
_MATHJAX_LOADER = re.compile(r"<script\s+src=[\"']" + re.escape(MATHJAX_BASE), re.I)


def add_csp(page: str) -> str:
    """``page`` with :data:`CSP_META` first in ``<head>`` and MathJax configured without eval().

    Only the template's head (up to ``<body``) is edited. A page that already has the meta is
    returned unchanged, so running this twice is harmless.
    """
    head, body = _HEAD.search(page), _BODY.search(page)
    if head is None or body is None or body.start() < head.end():
        return page
    start, end = head.end(), body.start()
    region = page[start:end]
    if region.lstrip().startswith((CSP_META, _FALLBACK_CSP_META)):
        return page
    region = _MATHJAX_CONFIG_BLOCK.sub("", region)
    region = _MATHJAX_LOADER.sub(lambda m: f"<script>{MATHJAX_CONFIG}</script>\n{m.group(0)}", region, count=1)
    return page[:start] + "\n" + CSP_META + region + page[end:]


class _Text(HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.in_body = False
        self.title: list[str] = []
        self.parts: list[str] = []
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        self.in_body = self.in_body or tag == "body"
        self._in_title = tag == "title" and not self.in_body
        if self.in_body and tag in ("p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6"):
            self.parts.append("\n")

    def handle_endtag(self, tag):
        self._in_title = False

    def handle_data(self, data):
        if self._in_title:
            self.title.append(data)
        elif self.in_body:
            self.parts.append(data)


def page_text(page: str) -> tuple[str, str]:
    """(title, text) of ``page``: what the body says, tags dropped, entities decoded.

    Taken from the feedback page itself, so hidden tests that nbgrader removed stay removed. A page
    with no ``<body>`` tag is all text.
    """
    parser = _Text()
    parser.feed(page if _BODY.search(page) else "<body>" + html.escape(page))
    parser.close()
    text = "".join(parser.parts)
    text = "\n".join(line.rstrip() for line in text.splitlines())
    return "".join(parser.title).strip(), re.sub(r"\n{3,}", "\n\n", text).strip() + "\n"


def fallback_page(title: str, text: str, reasons: list[str]) -> str:
    """A plain page: the note, then ``text`` escaped inside ``<pre>``; nothing in it can run."""
    e = html.escape
    why = "".join(f"<li>{e(r)}</li>" for r in reasons)
    return ("<!DOCTYPE html>\n<html>\n<head>\n"
            f"{_FALLBACK_CSP_META}\n"
            f'<meta charset="utf-8">\n<meta name="generator" content="{FALLBACK_MARKER}">\n'
            f"<title>{e(title)}</title>\n<style>{_FALLBACK_STYLE}</style>\n</head>\n<body>\n"
            "<p>This feedback page is shown as plain text because the submission contained markup "
            f"that could run in your browser:</p>\n<ul>{why}</ul>\n<pre>{e(text)}</pre>\n</body>\n</html>\n")


def secure_page(page: str) -> tuple[str, list[str]]:
    """(safe page, reasons): ``page`` with the CSP if nothing dangerous is left, else the fallback."""
    secured = add_csp(page)
    reasons = find_dangerous(secured)
    if not reasons:
        return secured, []
    title, text = page_text(page)
    return fallback_page(title, text, reasons), reasons


# Files a browser would run as a document if the instructor opened them. nbgrader copies every
# file of a submission into feedback/ (BaseConverter.init_assignment), next to the pages.
_HTML_SUFFIXES = {".html", ".htm"}
_ACTIVE_SUFFIXES = {".svg", ".svgz", ".xhtml", ".xht", ".xml", ".xsl", ".xslt", ".mht", ".mhtml",
                    ".shtml", ".shtm"}


def secure_feedback(course_root: str | Path, assignment: str) -> list[str]:
    """Secure every page under ``feedback/*/<assignment>/``; return what the instructor should know.

    Run after ``nbgrader generate_feedback`` (running it again changes nothing). Pages get the CSP
    silently; a page where dangerous markup survived is replaced by a plain-text page, with a note.
    nbgrader also copies every other file of a submission into feedback/
    (``BaseConverter.init_assignment``): those a browser would run as a document (``.svg``,
    ``.xhtml``...) get ``.txt`` appended, and links are removed, never written through.
    """
    notes: list[str] = []
    root = Path(course_root)
    for folder in sorted((root / "feedback").glob(f"*/{assignment}")):
        if folder.is_symlink() or not folder.is_dir():
            continue
        for dirpath, dirnames, filenames in os.walk(folder):
            dirnames.sort()
            for name in sorted(filenames + dirnames):
                path = Path(dirpath, name)
                shown = path.relative_to(root).as_posix()
                if path.is_symlink():
                    path.unlink()
                    notes.append(f"{shown}: removed (a symbolic link)")
                elif not path.is_file():
                    continue
                elif path.suffix.lower() in _ACTIVE_SUFFIXES:
                    path.rename(path.with_name(name + ".txt"))
                    notes.append(f"{shown}: renamed to {name}.txt (a browser would run it as a page)")
                elif path.suffix.lower() in _HTML_SUFFIXES:
                    reasons = _secure_file(path)
                    if reasons:
                        notes.append(f"{shown}: replaced by plain text ({'; '.join(reasons)})")
    return notes


def _secure_file(path: Path) -> list[str]:
    raw = path.read_bytes()
    try:
        page = raw.decode("utf-8")
    except UnicodeDecodeError:   # a browser might read it in another charset than we checked
        reasons = ["the page is not UTF-8"]
        safe = fallback_page(*page_text(raw.decode("utf-8", "replace")), reasons)
    else:
        safe, reasons = secure_page(page)
        if safe == page:
            return reasons
    mode = path.stat().st_mode
    path.chmod(mode | 0o200)     # nbgrader may have left it read-only
    path.write_text(safe, encoding="utf-8")
    path.chmod(mode)
    return reasons
