"""The strings in a ``.pt2`` that torch turns into running code, held to what ``torch.export.save`` writes.

``torch.export.load`` passes every symbolic-shape string to ``sympy.sympify`` (which ends in ``eval``), and
``ExportedProgram.module()`` compiles ``guards_code`` into a Python function. Both are parsed here with
``ast.parse`` (which never executes anything) and accepted only if every syntax node is of the few kinds those
strings are made of: arithmetic and comparisons over size symbols, integer literals and known sympy functions;
for guards, sizes and strides read from the inputs.
"""

from __future__ import annotations

import ast
import math
import re

from app.errors import InvalidUpload

MAX_EXPRESSION_CHARS = 4096
MAX_LITERAL = 10**12
MAX_EXPONENT = 8

SYMBOL_NAME = re.compile(r"[a-z]{1,4}[0-9]{1,9}")
# torch.utils._sympy.functions (the names torch's deserializer hands sympify) plus core sympy.
SYMPY_FUNCTIONS = frozenset(
    {
        "Symbol",
        "Integer",
        "Float",
        "Rational",
        "Add",
        "Mul",
        "Pow",
        "Max",
        "Min",
        "Abs",
        "Eq",
        "Ne",
        "Lt",
        "Le",
        "Gt",
        "Ge",
        "StrictLessThan",
        "StrictGreaterThan",
        "LessThan",
        "GreaterThan",
        "Equality",
        "Unequality",
        "And",
        "Or",
        "Not",
        "floor",
        "ceiling",
        "FloorDiv",
        "ModularIndexing",
        "Where",
        "PythonMod",
        "Mod",
        "CleanDiv",
        "CeilToInt",
        "FloorToInt",
        "CeilDiv",
        "LShift",
        "RShift",
        "PowByNatural",
        "IntTrueDiv",
        "FloatTrueDiv",
        "TruncToFloat",
        "TruncToInt",
        "RoundToInt",
        "ToFloat",
        "Identity",
    }
)
_POWERS = {"Pow", "PowByNatural"}
SYMPY_CONSTANTS = frozenset({"True", "False", "oo", "true", "false"})
SYMPY_ASSUMPTIONS = frozenset(
    {"positive", "negative", "nonnegative", "nonpositive", "integer", "real", "finite", "nonzero", "even", "odd"}
)
GUARD_METHODS = frozenset({"size", "stride", "storage_offset", "dim", "numel"})

_ARITHMETIC = (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.FloorDiv, ast.Mod, ast.Pow)
_UNARY = (ast.UAdd, ast.USub, ast.Not, ast.Invert)
_COMPARISONS = (ast.Eq, ast.NotEq, ast.Lt, ast.LtE, ast.Gt, ast.GtE)
_STRUCTURE = (ast.Expression, ast.Load, ast.And, ast.Or, ast.BinOp, ast.UnaryOp, ast.Compare, ast.BoolOp)
_SYNTAX = (*_STRUCTURE, *_ARITHMETIC, *_UNARY, *_COMPARISONS)


def _unsafe(what: str, text: str) -> InvalidUpload:
    return InvalidUpload(
        f"The .pt2 archive contains {what}, which torch would execute when loading it. Only plain "
        "torch.export.save output of standard operators is accepted.",
        code="unsafe_model",
        details={"expression": text[:200]},
    )


def _parse(text: str, what: str) -> ast.Expression:
    if len(text) > MAX_EXPRESSION_CHARS or "\x00" in text:
        raise _unsafe(f"an oversized {what}", text)
    try:
        return ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        raise _unsafe(f"a {what} that is not an expression", text) from exc


def _small_int(node: ast.AST) -> bool:
    """An integer literal of at most MAX_EXPONENT, bare, negated or as ``Integer(k)``."""
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub):
        node = node.operand
    if isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "Integer":
        if len(node.args) != 1 or node.keywords:
            return False
        node = node.args[0]
    return isinstance(node, ast.Constant) and type(node.value) is int and abs(node.value) <= MAX_EXPONENT


def _has_power(node: ast.AST) -> bool:
    return any(
        (isinstance(n, ast.BinOp) and isinstance(n.op, ast.Pow))
        or (isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id in _POWERS)
        for n in ast.walk(node)
    )


def _check_power(base: ast.AST, exponent: ast.AST, what: str, text: str) -> None:
    # An exponent tower is a denial of service when sympy evaluates it.
    if not _small_int(exponent) or _has_power(base):
        raise _unsafe(f"a {what} with a power that is not a small integer power", text)


def _number_ok(value: object) -> bool:
    if type(value) is bool:
        return True
    if type(value) is int:
        return abs(value) <= MAX_LITERAL
    if type(value) is float:
        return math.isfinite(value)
    return False


def check_sym_expr(text: str) -> None:
    """Refuse (``unsafe_model``) a symbolic-shape string that is more than sympy arithmetic over size symbols."""
    what = "symbolic shape expression"
    tree = _parse(text, what)
    symbol_names: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            if not isinstance(node.func, ast.Name) or node.func.id not in SYMPY_FUNCTIONS:
                raise _unsafe(f"a {what} calling something other than a sympy function", text)
            for kw in node.keywords:
                if kw.arg not in SYMPY_ASSUMPTIONS or not (
                    isinstance(kw.value, ast.Constant) and type(kw.value.value) is bool
                ):
                    raise _unsafe(f"a {what} with an unexpected keyword argument", text)
            if node.func.id == "Symbol":
                if len(node.args) != 1 or not isinstance(node.args[0], ast.Constant):
                    raise _unsafe(f"a {what} with a malformed Symbol", text)
                symbol_names.add(id(node.args[0]))
            if node.func.id in _POWERS:
                if len(node.args) != 2:
                    raise _unsafe(f"a {what} with a malformed power", text)
                _check_power(node.args[0], node.args[1], what, text)
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _ARITHMETIC):
                raise _unsafe(f"a {what} with the operator {type(node.op).__name__}", text)
            if isinstance(node.op, ast.Pow):
                _check_power(node.left, node.right, what, text)
        elif isinstance(node, ast.Constant):
            if isinstance(node.value, str):
                if id(node) not in symbol_names or not SYMBOL_NAME.fullmatch(node.value):
                    raise _unsafe(f"a {what} with a string that is not a size symbol", text)
            elif not _number_ok(node.value):
                raise _unsafe(f"a {what} with an oversized or unexpected literal", text)
        elif isinstance(node, ast.Name):
            if node.id not in SYMPY_FUNCTIONS | SYMPY_CONSTANTS and not SYMBOL_NAME.fullmatch(node.id):
                raise _unsafe(f"a {what} naming '{node.id[:50]}'", text)
        elif isinstance(node, (ast.keyword, ast.expr_context, *_SYNTAX)):
            continue
        else:
            raise _unsafe(f"a {what} with Python syntax ({type(node).__name__}) beyond arithmetic", text)


def _is_input_path(node: ast.AST) -> bool:
    """``L['x']``, ``L['x'][0]``, ``L['x']['k']``: a path into the program's inputs."""
    while isinstance(node, ast.Subscript):
        key = node.slice
        if not isinstance(key, ast.Constant) or not (
            (isinstance(key.value, str) and key.value.isidentifier() and not key.value.startswith("__"))
            or (type(key.value) is int and 0 <= key.value < 10_000)
        ):
            return False
        node = node.value
    return isinstance(node, ast.Name) and node.id == "L"


def check_guard_code(text: str) -> None:
    """Refuse (``unsafe_model``) guard code that is more than comparisons of input sizes and strides."""
    what = "guard"
    tree = _parse(text, what)
    allowed: set[int] = set()  # nodes vetted as part of L[...].size()[i]
    for node in ast.walk(tree):
        if id(node) in allowed:
            continue
        if isinstance(node, ast.Subscript) and _is_input_path(node):
            allowed.update(id(n) for n in ast.walk(node))
        elif isinstance(node, ast.Call):
            func = node.func
            if (
                not isinstance(func, ast.Attribute)
                or func.attr not in GUARD_METHODS
                or not _is_input_path(func.value)
                or node.keywords
                or len(node.args) > 1
                or any(not (isinstance(a, ast.Constant) and type(a.value) is int) for a in node.args)
            ):
                raise _unsafe(f"a {what} calling something other than size(), stride() or numel()", text)
            allowed.update(id(n) for n in ast.walk(node))
        elif isinstance(node, ast.Subscript):
            # size()[i] / stride()[i]: the indexed value is one of the vetted calls above.
            if not isinstance(node.value, ast.Call) or not (
                isinstance(node.slice, ast.Constant) and type(node.slice.value) is int
            ):
                raise _unsafe(f"a {what} indexing something other than a size", text)
            allowed.add(id(node.slice))
        elif isinstance(node, ast.BinOp):
            if not isinstance(node.op, _ARITHMETIC):
                raise _unsafe(f"a {what} with the operator {type(node.op).__name__}", text)
            if isinstance(node.op, ast.Pow):
                _check_power(node.left, node.right, what, text)
        elif isinstance(node, ast.Constant):
            if not _number_ok(node.value):
                raise _unsafe(f"a {what} with an unexpected literal", text)
        elif isinstance(node, (ast.expr_context, *_SYNTAX)):
            continue
        else:
            raise _unsafe(f"a {what} with Python syntax ({type(node).__name__}) beyond size comparisons", text)
