"""What a template may cost: a journey's author can write Jinja, and Jinja is a language in which a few
characters ask for gigabytes (``{{ 'x' * 4000000000 }}``, ``'%200000000d' | format(1)``) or for years of work
(two nested ``range(100000)`` loops). Templates are compiled when a journey is validated (a reader may ask)
and when the service loads, and rendered in the event loop, so either would stop orchestration. Limits:

- Any one value a template makes - text, a list - holds at most `MAX_TEXT` characters or items; an operator
  (``*``, ``**``, ``+``, ``%``), a filter or a method that would make a larger one is refused before it
  allocates (widths of ``format``, ``center``, ``indent``, ``ljust``, ...; ``join``; ``replace``), and the
  result of every filter and call is measured. Integers hold at most `MAX_INT_BITS` bits.
- A render (one part) takes at most `MAX_STEPS` steps - loop iterations and calls (macros, methods) - with
  calls nested at most `MAX_DEPTH` deep, and prints at most `MAX_TEXT` characters, counting text printed
  inside macros and ``{% set %}`` blocks too. ``recursive`` loops and ``lipsum`` are not available.
- What can be known without a person's data is refused when the journey is validated (`check_static`): a
  constant operation or filter over a limit, nested constant ``range`` loops of more than `MAX_STEPS`.

Operators in `BoundedEnvironment.intercepted_binops` are also not folded at compile time, so compiling a
template never does the work it describes. A limit reached while rendering raises `TemplateTooCostly`.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import re
import string
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from jinja2 import nodes, pass_context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.visitor import NodeTransformer
from markupsafe import Markup

#: characters in any one value (and items in a list), and characters one rendered part prints
MAX_TEXT = 1_000_000
#: loop iterations and calls in one render of one part
MAX_STEPS = 100_000
#: characters (and items) a render may read and make in all: reading a value or making one costs its size
MAX_WORK = 20_000_000
#: calls (macros, methods) nested in one another
MAX_DEPTH = 32
#: bits in an integer a template computes
MAX_INT_BITS = 4096
#: the indent `tojson` may ask for
MAX_JSON_INDENT = 16


class TemplateTooCostly(Exception):
    """A template asked for more than the limits above; the message names what, never a value."""


class _Budget:
    __slots__ = ("depth", "printed", "steps", "work")

    def __init__(self) -> None:
        self.steps = 0
        self.work = 0
        self.printed = 0
        self.depth = 0

    def step(self) -> None:
        self.steps += 1
        if self.steps > MAX_STEPS:
            raise TemplateTooCostly(f"more than {MAX_STEPS} loop iterations and calls in one render")

    def spend(self, size: int) -> None:
        self.work += size
        if self.work > MAX_WORK:
            raise TemplateTooCostly(f"reads and makes more than {MAX_WORK} characters in one render")

    def print(self, size: int) -> None:
        self.printed += size
        if self.printed > MAX_TEXT:
            raise TemplateTooCostly(f"prints more than {MAX_TEXT} characters")


_BUDGET: contextvars.ContextVar[_Budget | None] = contextvars.ContextVar("template_budget", default=None)
# refusals met while Jinja folded constants at compile time (it turns a filter's error into "not constant")
_FOLDING: contextvars.ContextVar[list[str] | None] = contextvars.ContextVar("template_folding", default=None)


def _refuse(what: str) -> TemplateTooCostly:
    folding = _FOLDING.get()
    if folding is not None:
        folding.append(what)
    return TemplateTooCostly(what)


def _size(value: Any) -> int:
    if isinstance(value, (str, list, tuple, dict, set, frozenset, bytes)):
        return len(value)
    return 0


def _spend(value: Any) -> Any:
    budget = _BUDGET.get()
    if budget is not None:
        budget.spend(_size(value))
    return value


def _bounded(value: Any, what: str) -> Any:
    _spend(value)
    if _size(value) > MAX_TEXT:
        raise _refuse(f"{what} makes a value of more than {MAX_TEXT} characters or items")
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > MAX_INT_BITS:
        raise _refuse(f"{what} makes an integer of more than {MAX_INT_BITS} bits")
    return value


def _at_most(size: int, what: str) -> None:
    if size > MAX_TEXT:
        raise _refuse(f"{what} would make a value of more than {MAX_TEXT} characters or items")


def _count(value: Any) -> int:
    """A width or count argument as a number (0 when it is not one: the filter reports that itself)."""
    if isinstance(value, bool):
        return 0
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value == value and abs(value) != float("inf"):
        return int(value)
    return 0


# printf conversions: %[(key)][flags][width][.precision][length]type
_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0\- +]*(\*|\d+)?(?:\.(\*|\d*))?[hlL]?[a-zA-Z%]")


def _check_printf(text: str, what: str) -> None:
    total = len(text)
    for match in _PRINTF.finditer(text):
        width, precision = match.group(1), match.group(2)
        if width == "*" or precision == "*":
            raise _refuse(f"{what}: a '*' width or precision is not supported, write the number")
        total += int(width or 0) + int(precision or 0)
    _at_most(total, what)


def _check_format_spec(text: str, what: str) -> None:
    total = len(text)
    for _literal, _field, spec, _conversion in string.Formatter().parse(text):
        if not spec:
            continue
        if "{" in spec:
            raise _refuse(f"{what}: a width from an argument ({{:{{...}}}}) is not supported, write the number")
        total += sum(int(number) for number in re.findall(r"\d+", spec))
    _at_most(total, what)


def _binop(operator: str, left: Any, right: Any) -> Any:
    """`left <operator> right` once it is known to stay within the limits."""
    what = f"the operator {operator!r}"
    if operator == "*":
        for seq, times in ((left, right), (right, left)):
            if isinstance(seq, (str, list, tuple)) and isinstance(times, int):
                _at_most(len(seq) * max(times, 0), what)
        if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
            raise _refuse(f"{what} would make an integer of more than {MAX_INT_BITS} bits")
        return _bounded(left * right, what)
    if operator == "**":
        if _is_int(left) and _is_int(right) and right > 0 and (abs(left).bit_length() - 1) * right > MAX_INT_BITS:
            raise _refuse(f"{what} would make an integer of more than {MAX_INT_BITS} bits")
        return _bounded(left**right, what)
    if operator == "+":
        if isinstance(left, (str, list, tuple)) and isinstance(right, (str, list, tuple)):
            _at_most(len(left) + len(right), what)
        return _bounded(left + right, what)
    if operator == "%":
        if isinstance(left, str):
            _check_printf(left, what)
        return _bounded(left % right, what)
    raise AssertionError(operator)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_call(obj: Any, args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> tuple[Any, ...]:
    """Refuse a str method call that would make a value over the limit; the args to call it with."""
    owner = getattr(obj, "__self__", None)
    if not isinstance(owner, str):
        return args
    name = getattr(obj, "__name__", "")
    what = f"the method {name!r}"
    if name in ("ljust", "rjust", "center", "zfill") and args:
        _at_most(_count(args[0]), what)
    elif name == "expandtabs":
        tab = _count(args[0] if args else kwargs.get("tabsize", 8))
        _at_most(len(owner) + owner.count("\t") * tab, what)
    elif name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        hits = owner.count(args[0]) if args[0] else len(owner) + 1
        _at_most(len(owner) + hits * len(args[1]), what)
    elif name == "join" and args:
        items = list(args[0])
        _at_most(_joined_size(items, owner), what)
        return (items, *args[1:])
    return args


def _joined_size(items: list[Any], separator: str) -> int:
    total = len(separator) * max(len(items) - 1, 0)
    _at_most(total, "join")
    for item in items:
        total += len(item) if isinstance(item, str) else len(str(item))
        _at_most(total, "join")
    return total


# ---- filters: the ones that take a size check it before they run; every filter's result is measured


def _precheck_filter(name: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple[Any, ...], bool]:
    """Arguments to run filter `name` with (a join's items, listed once), refusing those over a limit."""
    what = f"the filter {name!r}"
    value = args[0] if args else ""
    rest = args[1:]
    text = value if isinstance(value, str) else ""
    if name == "format" and isinstance(value, str):
        _check_printf(value, what)
    elif name == "center":
        _at_most(_count(rest[0] if rest else kwargs.get("width", 80)), what)
    elif name == "indent":
        width = rest[0] if rest else kwargs.get("width", 4)
        pad = len(width) if isinstance(width, str) else _count(width)
        _at_most(pad, what)
        _at_most(len(text) + (text.count("\n") + 1) * pad, what)
    elif name == "wordwrap":
        wrap = rest[2] if len(rest) > 2 else kwargs.get("wrapstring") or "\n"
        _at_most(len(text) + (len(text) + 1) * len(str(wrap)), what)
    elif name == "replace" and len(rest) >= 2:
        old, new = str(rest[0]), str(rest[1])
        hits = text.count(old) if old else len(text) + 1
        _at_most(len(text) + hits * len(new), what)
    elif name == "truncate":
        end = rest[2] if len(rest) > 2 else kwargs.get("end", "...")
        _at_most(len(str(end)), what)
    elif name in ("batch", "slice"):
        count = _count(rest[0] if rest else kwargs.get("linecount" if name == "batch" else "slices", 0))
        if name == "slice" or (len(rest) > 1 or kwargs.get("fill_with") is not None):
            _at_most(count, what)
    elif name == "join" and not isinstance(value, str):
        items = list(value) if isinstance(value, Iterable) else value
        separator = rest[0] if rest else kwargs.get("d", "")
        if isinstance(items, list) and not (len(rest) > 1 or kwargs.get("attribute") is not None):
            _at_most(_joined_size(items, str(separator)), what)
        return (items, *rest), True
    elif name == "tojson":
        indent = rest[0] if rest else kwargs.get("indent")
        if indent is not None and _count(indent) > MAX_JSON_INDENT:
            raise _refuse(f"{what}: indent is at most {MAX_JSON_INDENT}")
    return args, False


def _bounded_filter(name: str, func: Any) -> Any:
    @functools.wraps(func)
    def run(*args: Any, **kwargs: Any) -> Any:
        # a filter that takes the context or environment first gets it as args[0]
        lead = 1 if getattr(func, "jinja_pass_arg", None) is not None else 0
        checked, _ = _precheck_filter(name, args[lead:], kwargs)
        return _bounded(func(*args[:lead], *checked, **kwargs), f"the filter {name!r}")

    return run


class BoundedEnvironment(ImmutableSandboxedEnvironment):
    """The sandbox with the limits above: operators, filters, calls and loops are measured."""

    intercepted_binops = frozenset({"*", "**", "+", "%"})

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        self.filters = {name: _bounded_filter(name, func) for name, func in self.filters.items()}
        self.globals.pop("lipsum", None)
        self.globals["range"] = _range
        # the hooks `_Hooks` puts in the compiled tree: filters (called directly, not through `call`) under
        # names a template cannot write (a filter name is an identifier, and these have a hyphen)
        self.filters.update({READ: _spend, SIZED: _sized, TEXT: _text})

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        return _binop(operator, left, right)

    def wrap_str_format(self, value: Any) -> Any:
        wrapped = super().wrap_str_format(value)
        if wrapped is None:
            return None
        _check_format_spec(value.__self__, f"the method {value.__name__!r}")
        return wrapped

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        args = _check_call(__obj, args, kwargs)
        if budget is None:
            return _bounded(super().call(__context, __obj, *args, **kwargs), "a call")
        budget.step()
        budget.depth += 1
        try:
            if budget.depth > MAX_DEPTH:
                raise TemplateTooCostly(f"calls nested more than {MAX_DEPTH} deep")
            return _bounded(super().call(__context, __obj, *args, **kwargs), "a call")
        finally:
            budget.depth -= 1

    # the loop hook the compiled template calls (see `_Hooks`)
    @staticmethod
    def cdp_loop(iterable: Any) -> Iterator[Any]:
        return _loop(iterable)


def _loop(iterable: Any) -> Iterator[Any]:
    budget = _BUDGET.get()
    for item in iterable:
        if budget is not None:
            budget.step()
        yield item


def _range(*args: Any) -> range:
    numbers = range(*args)
    if len(numbers) > MAX_STEPS:
        raise _refuse(f"range() of more than {MAX_STEPS} numbers")
    return numbers


@pass_context  # taking the context keeps Jinja from folding it into constant text when it compiles
def _text(_context: Any, data: str) -> Markup:
    """Literal template text, now printed through `finalize` (which counts it) and kept as written."""
    return Markup(data)


def _sized(value: Any) -> Any:
    return _bounded(value, "the operator '~'")


READ, SIZED, TEXT = "cdp-read", "cdp-sized", "cdp-text"


def counting_finalize(inner: Any) -> Any:
    """A `finalize` that counts every printed value against the render's budget."""

    def finalize(value: Any) -> Any:
        out = inner(value)
        budget = _BUDGET.get()
        if budget is not None:
            budget.print(len(out) if isinstance(out, str) else len(str(out)))
        return out

    return finalize


class _Hooks(NodeTransformer):
    """Route every loop's items, every piece of literal text that can print more than once (in a loop, a macro,
    a call block) and every value read (a name, an attribute, an item) through the hooks that count them:
    what a render reads bounds the work of whatever it does with it (comparing, searching, measuring), which
    no hook sees."""

    def __init__(self) -> None:
        self.repeated = 0  # inside a loop, macro or call block: text there prints as often as they run

    def _repeated(self, node: nodes.Node) -> None:
        self.repeated += 1
        try:
            self.generic_visit(node)
        finally:
            self.repeated -= 1

    def visit_Macro(self, node: nodes.Macro) -> nodes.Node:
        self._repeated(node)
        return node

    def visit_CallBlock(self, node: nodes.CallBlock) -> nodes.Node:
        self._repeated(node)
        return node

    def visit_For(self, node: nodes.For) -> nodes.Node:
        self._repeated(node)
        node.iter = nodes.Call(nodes.EnvironmentAttribute("cdp_loop"), [node.iter], [], None, None, lineno=node.lineno)
        return node

    def _read(self, node: nodes.Expr) -> nodes.Node:
        self.generic_visit(node)
        if getattr(node, "ctx", "load") != "load":
            return node
        return nodes.Filter(node, READ, [], [], None, None, lineno=node.lineno)

    visit_Name = visit_Getattr = visit_Getitem = _read

    def visit_Concat(self, node: nodes.Concat) -> nodes.Node:
        self.generic_visit(node)
        return nodes.Filter(node, SIZED, [], [], None, None, lineno=node.lineno)

    def visit_Output(self, node: nodes.Output) -> nodes.Node:
        self.generic_visit(node)
        if not self.repeated:  # printed once a render: no more than the template's own text
            return node
        node.nodes = [
            nodes.Filter(nodes.Const(child.data), TEXT, [], [], None, None, lineno=child.lineno)
            if isinstance(child, nodes.TemplateData)
            else child
            for child in node.nodes
        ]
        return node


def instrument(tree: nodes.Template) -> nodes.Template:
    """`tree` with its loops and text counted (changed in place)."""
    return _Hooks().visit(tree)


def check_static(tree: nodes.Template, environment: BoundedEnvironment) -> str | None:
    """What in `tree` is over a limit whatever the person's data (a message naming it), or None."""
    for node in tree.find_all(nodes.For):
        if node.recursive:
            return "a recursive loop is not supported: write the levels out, or use a macro"
    context = nodes.EvalContext(environment)
    for node in tree.find_all(nodes.BinExpr):
        if node.operator not in environment.intercepted_binops:
            continue
        try:
            left, right = node.left.as_const(context), node.right.as_const(context)
        except nodes.Impossible:
            continue
        try:
            _binop(node.operator, left, right)
        except TemplateTooCostly as refused:
            return f"line {node.lineno}: {refused}"
        except Exception:
            continue
    worst = _loop_product(tree, context)
    if worst > MAX_STEPS:
        return f"nested loops of {worst} iterations in all; a render takes at most {MAX_STEPS}"
    return None


def _loop_product(node: nodes.Node, context: nodes.EvalContext) -> int:
    """The most iterations nested constant `range` loops under `node` ask for."""
    worst = 1
    for child in node.iter_child_nodes():
        inner = _loop_product(child, context)
        if isinstance(child, nodes.For):
            inner *= _range_size(child.iter, context)
        worst = max(worst, inner)
    return worst


def _range_size(node: nodes.Node, context: nodes.EvalContext) -> int:
    if not (isinstance(node, nodes.Call) and isinstance(node.node, nodes.Name) and node.node.name == "range"):
        return 1
    if node.kwargs or node.dyn_args or node.dyn_kwargs:
        return 1
    try:
        args = [arg.as_const(context) for arg in node.args]
        return len(range(*args))
    except Exception:
        return 1


@contextlib.contextmanager
def folding() -> Iterator[list[str]]:
    """Collect the limits constant folding met while a template compiled: `with folding() as refused:`."""
    found: list[str] = []
    token = _FOLDING.set(found)
    try:
        yield found
    finally:
        _FOLDING.reset(token)


@contextlib.contextmanager
def budget() -> Iterator[None]:
    """The budget of one render: `with budget(): template.render(...)`."""
    token = _BUDGET.set(_Budget())
    try:
        yield
    finally:
        _BUDGET.reset(token)
