"""What the built site carries besides its pages: MathJax, the course package, launch links.

* **MathJax** is copied from Debian's ``libjs-mathjax``/``fonts-mathjax`` (2.7.x) into the site's
  ``_static/mathjax/`` and loaded by a relative path, so the math renders with no network,
  wherever the folder is served from (a CDN would fail offline; a ``file://`` path only works on
  the machine that built it). Only what the CommonHTML output needs is copied (about 1.2 MB of
  the package's 54 MB); a browser loads about 300 kB of it.
* **The course package** (``autograder``: the visible checks, no solutions) is built as a wheel
  into ``_static/``, so a chapter notebook downloaded from the book runs its visible tests
  outside this repository (``pip install <wheel>``).
* **Launch buttons** (Binder, Colab) point at the page's own source file, which for a chapter
  is a generated page that is not in the repository: they are pointed at the chapter's released
  notebook in ``notebooks/`` instead.
"""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .course import CHAPTERS, REPO

#: Generated static files (git-ignored); ``_config.yml`` lists it in ``html_static_path``.
STATIC = REPO / "_build" / "static"
DEBIAN_MATHJAX = Path("/usr/share/javascript/mathjax")
#: ``mathjax_path`` in ``_config.yml``, relative to ``_static/``: the TeX input and the
#: CommonHTML output, which needs only the TeX web fonts (woff).
MATHJAX_CONFIG = "TeX-AMS_CHTML"
MATHJAX_PARTS = ["MathJax.js", f"config/{MATHJAX_CONFIG}.js", "jax/input/TeX", "jax/element",
                 "jax/output/CommonHTML", "extensions", "fonts/HTML-CSS/TeX/woff"]
WHEEL_NAME = "attention_from_scratch-0.1.0-py3-none-any.whl"   # pyproject.toml's name and version


def copy_mathjax(static: Path = STATIC, source: Path = DEBIAN_MATHJAX) -> Path:
    """``static/mathjax/``: the parts of MathJax 2.7 the book loads (real files, no links)."""
    if not (source / "MathJax.js").exists() or not (source / "fonts/HTML-CSS/TeX/woff").is_dir():
        raise RuntimeError("the book carries its own MathJax, copied from Debian's packages: "
                           "apt-get install -y libjs-mathjax fonts-mathjax")
    out = static / "mathjax"
    for part in MATHJAX_PARTS:
        src, dst = source / part, out / part
        dst.parent.mkdir(parents=True, exist_ok=True)
        if src.is_dir():
            shutil.copytree(src, dst, dirs_exist_ok=True)
        else:
            shutil.copyfile(src, dst)
    return out


def build_wheel(static: Path = STATIC) -> Path:
    """``static/<wheel>``: the ``autograder`` package built from a clean copy of its sources
    (no ``build/`` or ``*.egg-info`` left in the repository, no ``__pycache__`` in the wheel)."""
    out = static / "wheels"
    out.mkdir(parents=True, exist_ok=True)
    sources = [REPO / "pyproject.toml", *(REPO / "autograder").rglob("*.py")]
    wheel = out / WHEEL_NAME
    if wheel.exists() and wheel.stat().st_mtime > max(p.stat().st_mtime for p in sources):
        return wheel                                 # up to date: pip costs about 6 s
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(REPO / "pyproject.toml", tmp)
        shutil.copytree(REPO / "autograder", Path(tmp, "autograder"),
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                        "-w", tmp + "/dist", tmp], check=True)
        built = sorted(Path(tmp, "dist").glob("*.whl"))
        if [p.name for p in built] != [WHEEL_NAME]:
            raise RuntimeError(f"expected {WHEEL_NAME}, pip built {[p.name for p in built]} "
                               "(update WHEEL_NAME and the links to it in book/)")
        shutil.copyfile(built[0], out / WHEEL_NAME)
    return out / WHEEL_NAME


def point_launch_buttons_at_notebooks(html: Path, chapters=CHAPTERS) -> int:
    """Rewrite launch links from the generated page (``book/_chapters/<ch>.ipynb``, not in the
    repository) to the released notebook (``notebooks/<ch>/<ch>.ipynb``). Returns how many pages
    changed."""
    changed = 0
    for chapter in chapters:
        page = html / "book" / "_chapters" / f"{chapter}.html"
        if not page.exists():
            continue
        text = page.read_text()
        # The page's own download (``_sources/book/_chapters/...``) stays as it is.
        new = re.sub(rf"(?<!_sources/)book/_chapters/{chapter}\.ipynb", f"notebooks/{chapter}/{chapter}.ipynb", text)
        if new != text:
            page.write_text(new)
            changed += 1
    return changed
