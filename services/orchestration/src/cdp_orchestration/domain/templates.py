"""Message templates: Jinja2 in its sandbox, over the person's profile fields.

A template is a mapping of parts (`subject`, `body`, `title`, ...) to Jinja2 text. It reads profile fields
by their flat keys' roots: `{{ traits.first_name }}`, `{{ computed.orders_90d }}`, `{{ scores.churn_risk }}`,
`{{ consent["purpose:Marketing"] }}`, and the instance's entry properties (the entry event's properties or an
Enroll call's) as `{{ entry.cart_url }}`. Invariants:

- A field the person does not have (absent or null) is an error naming it (`MissingField("traits.first_name")`),
  never a blank in a sent message. Guard optional fields in the template itself:
  `{% if traits.first_name is defined %}...{% endif %}` or `{{ traits.first_name | default("there") }}`.
- Templates run in Jinja's immutable sandbox: no attribute access to Python internals, no I/O, no changing a
  list or dict in place; and within the limits of `template_limits` (the size of a value, the steps and
  printed length of a render), refused when validated where the text alone shows it.
- A value in an HTML part (`HTML_PARTS`: an email's ``html``) is HTML-escaped, so a trait such as
  ``<a href=…>`` or ``<script>`` arrives as text, not markup; the markup the journey's author wrote in the
  template text is kept as written. Every other part is text (the email's plain part, SMS, push, webhook
  bodies) and carries values as they are; a channel whose format has control characters of its own
  escapes them itself (Slack's in `channels.webhook`). An author can mark a value as markup with
  ``| safe``, which hands that field's content to the HTML as it is: never for a field a person can write.
- Escaping keeps a value inside its attribute, not out of a link's reach: ``href="{{ traits.website }}"``
  with ``javascript:…`` is still a script the reader runs with one click. A link target a person can write
  goes through ``| url`` (`_web_url`): an absolute http(s) URL is kept, anything else prints ``#``.
- `compile_template` checks syntax and lists the fields a template reads (`Template.fields`), so a journey is
  validated against the catalogue of known fields before it is published, not when a message fails.
- Errors name the part and field, never a value from the profile.
- Numbers print as people write them: `{{ entry.price }}` of 399.0 (numbers travel as doubles) prints 399,
  and 0.1 + 0.2 prints 0.3, not 0.30000000000000004 (`_as_written`). An author formats explicitly where it
  matters: `{{ '%.2f' | format(entry.price) }}`, `{{ scores.churn_risk | round(3) }}`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import jinja2
from jinja2 import nodes
from jinja2.sandbox import SecurityError

from cdp_kit.errors import InvalidArgument
from cdp_kit.profile_fields import ROOTS
from cdp_orchestration.domain import template_limits as limits
from cdp_orchestration.domain.template_limits import BoundedEnvironment, TemplateTooCostly
from cdp_orchestration.domain.view import ENTRY, PersonView

_NAMES = (*ROOTS, ENTRY)


class TemplateFailed(Exception):
    """A part could not be rendered for this person (a division by zero, text minus a number); the message
    names the part and the error's type, never a value."""


class MissingField(Exception):
    """A template read a field the person does not have. `field` is the flat key ("traits.first_name")."""

    def __init__(self, field: str, part: str) -> None:
        super().__init__(f"template part {part!r} reads {field}, which this person does not have")
        self.field = field
        self.part = part


class _Fields(dict):
    """A dict that knows its own path, so a missing key below it names the full field."""

    path: str = ""


class _Missing(jinja2.StrictUndefined):
    """Undefined that names the field: any use of it (print, compare, iterate) raises MissingField."""

    __slots__ = ()

    def _fail_with_undefined_error(self, *args: Any, **kwargs: Any) -> Any:
        owner = self._undefined_obj
        name = self._undefined_name
        if isinstance(owner, _Fields):
            field = f"{owner.path}.{name}"
        elif owner is jinja2.utils.missing:
            field = str(name)
        else:
            field = f"{name} (inside a value)"
        raise MissingField(field, "")


# Jinja's Undefined binds every operator (`*`, `<`, `len`, `str`, ...) to its own failure function when the class
# is made; point each of them at the one above so every use of a missing field names it.
_BASE_FAILURES = {jinja2.Undefined._fail_with_undefined_error, jinja2.StrictUndefined._fail_with_undefined_error}
for _klass in (jinja2.Undefined, jinja2.StrictUndefined):
    for _name, _value in vars(_klass).items():
        if _name.startswith("__") and _value in _BASE_FAILURES:
            setattr(_Missing, _name, _Missing._fail_with_undefined_error)


def _as_written(value: Any) -> Any:
    """What `{{ ... }}` prints. Every number in a profile or an event travels as a double, so 399 arrives as
    399.0 and arithmetic adds binary noise (0.1 + 0.2): print whole numbers as integers and others with at
    most 15 significant digits, which a double holds exactly. A fixed form is the author's to ask for
    (`'%.2f' | format(...)` prints text, untouched here); this only changes how a float prints."""
    if type(value) is not float or not math.isfinite(value):
        return value
    if value.is_integer() and abs(value) < 1e15:
        return int(value)
    return format(value, ".15g")


#: what `| url` prints for a value that is not a web link
NOT_A_LINK = "#"
#: link schemes `| url` keeps
WEB_SCHEMES = frozenset({"http", "https"})
# Browsers drop tabs and newlines anywhere in a URL and control characters and spaces around it, so
# "java\tscript:" runs as "javascript:". A value carrying any of them is no link at all here.
_BLURRED = re.compile(r"[\x00-\x20\x7f]")


def _web_url(value: Any) -> str:
    """`| url`: `value` when it is an absolute http or https URL (a host after ``//``), else NOT_A_LINK.
    Everything else - ``javascript:``, ``data:``, ``vbscript:``, relative and scheme-relative (``//host``)
    links, text with whitespace or control characters in it - would be run, or land somewhere the author
    did not pick. A missing field is still named (MissingField), never a ``#``. In an HTML part the URL is
    then HTML-escaped like any value (``&`` as ``&amp;``)."""
    text = value if isinstance(value, str) else str(value)  # str() of a missing field raises MissingField
    if not text or _BLURRED.search(text):
        return NOT_A_LINK
    try:
        parts = urlsplit(text)
    except ValueError:  # an unbalanced IPv6 bracket, say
        return NOT_A_LINK
    if (
        parts.scheme.lower() not in WEB_SCHEMES
        or not parts.netloc
        or not text.lower().startswith(parts.scheme.lower() + "://")
    ):
        return NOT_A_LINK
    return text


#: parts rendered as HTML: their values are escaped
HTML_PARTS = frozenset({"html"})

_ENV = BoundedEnvironment(
    undefined=_Missing, autoescape=False, keep_trailing_newline=True, finalize=limits.counting_finalize(_as_written)
)
_HTML_ENV = BoundedEnvironment(
    undefined=_Missing, autoescape=True, keep_trailing_newline=True, finalize=limits.counting_finalize(_as_written)
)
for _env in (_ENV, _HTML_ENV):
    _env.filters["url"] = _web_url


@dataclass(frozen=True, eq=False)
class Template:
    """A compiled template: its parts and the profile fields it reads (flat keys)."""

    source: Mapping[str, str]
    fields: frozenset[str]  # profile fields, flat keys ("traits.first_name")
    entry_fields: frozenset[str]  # entry properties ("entry.cart_url")
    _parts: Mapping[str, jinja2.Template]

    def render(self, view: PersonView, entry: Mapping[str, Any] | None = None) -> dict[str, str]:
        """Every part rendered for this person (and instance's entry properties); MissingField naming the
        first field they lack."""
        context = _context(view)
        context[ENTRY] = _wrap(ENTRY, entry or {})
        rendered: dict[str, str] = {}
        for part, template in self._parts.items():
            try:
                with limits.budget():
                    rendered[part] = template.render(context)
            except TemplateTooCostly as refused:
                raise TemplateTooCostly(f"template part {part!r}: {refused}") from None
            except SecurityError as refused:  # changing a list in place, reading an internal: names no value
                raise TemplateTooCostly(f"template part {part!r}: the sandbox refuses it: {refused}") from None
            except MissingField as missing:
                raise MissingField(missing.field, part) from None
            except jinja2.UndefinedError:
                # A missing value reached some path the names above do not cover: still never a blank.
                raise MissingField("a field the template reads", part) from None
            except Exception as failed:  # 1 / 0, 'a' - 1, int('x'): named by type only, its text may quote a value
                raise TemplateFailed(f"template part {part!r} failed: {type(failed).__name__}") from None
        return rendered


class RefusedTemplate(Template):
    """A template stored by an earlier release that the validation now refuses (`lipsum`, a constant over a
    limit): kept so its journey's running instances carry on, every render failing, naming its field."""

    def __init__(self, source: Mapping[str, str], field: str) -> None:
        super().__init__(source, frozenset(), frozenset(), {})
        object.__setattr__(self, "field", field)

    def render(self, view: PersonView, entry: Mapping[str, Any] | None = None) -> dict[str, str]:
        field = self.field  # type: ignore[attr-defined]
        raise TemplateFailed(f"template {field} no longer validates: publish a fixed version of the journey")


def compile_template(source: Any, field: str) -> Template:
    """A template from its parts; InvalidArgument on `<field>.<part>` for a syntax error or a bad reference."""
    if not isinstance(source, Mapping) or not source:
        raise InvalidArgument(field, 'must be an object of parts, like {"subject": "...", "body": "..."}')
    parts: dict[str, jinja2.Template] = {}
    fields: set[str] = set()
    for part, text in source.items():
        at = f"{field}.{part}"
        if not isinstance(text, str):
            raise InvalidArgument(at, "must be template text")
        env = _HTML_ENV if part in HTML_PARTS else _ENV
        try:
            with limits.folding() as refused:  # compiling folds constants: a filter over a limit is met here
                tree = env.parse(text)
                names = _free_names(tree)  # compiles the tree: a filter that does not exist is found here
                compiled = env.template_class.from_code(
                    env, env.compile(limits.instrument(env.parse(text))), env.make_globals(None), None
                )
        except jinja2.TemplateSyntaxError as error:
            raise InvalidArgument(at, f"line {error.lineno}: {error.message}") from None
        too_costly = refused[0] if refused else limits.check_static(tree, env)
        if too_costly:
            raise InvalidArgument(at, f"{too_costly}; see the template limits in docs/journeys/README.md")
        for name in names:
            if name not in _NAMES:
                raise InvalidArgument(
                    at, f"reads {name!r}, which is not a profile root: use {', '.join(r + '.<name>' for r in _NAMES)}"
                )
        fields.update(_field_reads(tree))
        parts[part] = compiled
    entry = frozenset(f for f in fields if f.startswith(f"{ENTRY}."))
    return Template(dict(source), frozenset(fields) - entry, entry, parts)


def whole_roots(template: Template) -> frozenset[str]:
    """The profile roots a template may read any field of: a root named other than as `root.name` or
    `root["name"]` (`{% for k, v in scores.items() %}`, `computed[traits.key]`, `{% set s = scores %}`).
    `Template.fields` cannot list what those read, so whoever keeps only the fields read keeps the whole
    root. A part that does not parse (a refused template) counts as reading every root."""
    found: set[str] = set()
    for part, text in template.source.items():
        env = _HTML_ENV if part in HTML_PARTS else _ENV
        try:
            tree = env.parse(text)
        except Exception:
            return frozenset(ROOTS)
        named: dict[str, int] = {}
        for node in tree.find_all(nodes.Name):
            if node.name in ROOTS:
                named[node.name] = named.get(node.name, 0) + 1
        for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
            base = node.node
            if not (isinstance(base, nodes.Name) and base.name in ROOTS):
                continue
            if isinstance(node, nodes.Getattr):
                if not hasattr(_Fields, node.attr):  # `scores.items` is the mapping's method, no field
                    named[base.name] -= 1
            elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
                named[base.name] -= 1
        found.update(root for root, count in named.items() if count > 0)
    return frozenset(found)


def _free_names(tree: nodes.Template) -> set[str]:
    from jinja2 import meta

    return set(meta.find_undeclared_variables(tree))


def _field_reads(tree: nodes.Template) -> set[str]:
    """Flat keys read as `root.name` or `root["name"]` (the first step below a root is the field)."""
    found: set[str] = set()
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        base = node.node
        if not (isinstance(base, nodes.Name) and base.name in _NAMES):
            continue
        if isinstance(node, nodes.Getattr):
            found.add(f"{base.name}.{node.attr}")
        elif isinstance(node.arg, nodes.Const) and isinstance(node.arg.value, str):
            found.add(f"{base.name}.{node.arg.value}")
    return found


def _context(view: PersonView) -> dict[str, Any]:
    roots = {root: _branch(root) for root in ROOTS}
    for key, value in view.fields.items():
        root, dot, name = key.partition(".")
        if dot and root in roots and value is not None:
            roots[root][name] = _wrap(f"{key}", value)
    return roots


def _branch(path: str) -> _Fields:
    branch = _Fields()
    branch.path = path
    return branch


def _wrap(path: str, value: Any) -> Any:
    if isinstance(value, Mapping):
        branch = _branch(path)
        for key, inner in value.items():
            if inner is not None:
                branch[key] = _wrap(f"{path}.{key}", inner)
        return branch
    return value
