"""Rendering the report pages from their templates (``restorer/report/templates/``).

Both pages extend one skeleton (``base.html``: the Content-Security-Policy, ``report.css`` and
``report.js``). Jinja2 autoescapes every value; only our own CSS, script and CSP are marked
safe. The templates and the stylesheet ship as package data (see pyproject.toml).
"""

from __future__ import annotations

import base64
import functools
import hashlib
from importlib import resources
from typing import Any

import jinja2
from markupsafe import Markup


def fmt(value: Any) -> str:
    """A number as the report's tables show it: 3 significant digits below 1000, thousands
    separators for integers and larger floats; anything else as ``str``."""
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


@functools.cache
def _environment() -> jinja2.Environment:
    environment = jinja2.Environment(
        loader=jinja2.PackageLoader("restorer.report", "templates"), autoescape=True,
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    environment.filters["fmt"] = fmt
    environment.filters["num"] = format  # {{ value|num(".2f") }} is format(value, ".2f")
    return environment


@functools.cache
def _skeleton() -> dict[str, Markup]:
    """The skeleton's own style, script and CSP (the CSP allows only that script, by hash)."""
    folder = resources.files("restorer.report") / "templates"
    script = (folder / "report.js").read_text("utf-8").strip()
    digest = base64.b64encode(hashlib.sha256(script.encode("utf-8")).digest()).decode()
    # No network at all, and no script but ours: a key that slipped past escaping could not run.
    csp = (f"default-src 'none'; img-src data:; style-src 'unsafe-inline'; "
           f"script-src 'sha256-{digest}'")
    return {"style": Markup((folder / "report.css").read_text("utf-8")),
            "script": Markup(script), "csp": Markup(csp)}


def page(template: str, title: str, **context: Any) -> str:
    """The page ``template`` (``job.html`` or ``train.html``) with ``context``, as text."""
    return _environment().get_template(template).render(title=title, **_skeleton(),
                                                         **context) + "\n"
