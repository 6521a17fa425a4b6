"""GBNF grammars that make the output parse: JSON mode, JSON schemas and forced tool calls.

JSON schemas are converted with llama-cpp-python's converter (a port of llama.cpp's
``json_schema_to_grammar.py``). That converter ignores what it does not know, so every schema is
first walked here: a keyword it would not enforce is refused by name (``SchemaError``), never
silently dropped, and size, depth and repetition bounds keep the grammar (and the work of
sampling with it) small. Messages name only keywords from fixed lists, never schema content.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

from llama_cpp.llama_grammar import JSON_GBNF, SchemaConverter

MAX_SCHEMA_BYTES = 32 * 1024
MAX_DEPTH = 12
MAX_NODES = 1000
MAX_REPEAT = 256  # minItems, maxItems, minLength, maxLength
MAX_GRAMMAR = 256 * 1024

# Keywords the converter turns into grammar rules.
_ENFORCED = frozenset(
    {
        "type",
        "properties",
        "required",
        "additionalProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "enum",
        "const",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "$defs",
        "definitions",
        "pattern",
        "format",
        "minLength",
        "maxLength",
    }
)
# Annotations: they constrain nothing, so ignoring them is correct.
_ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "$schema",
        "$id",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "nullable",
        "strict",
    }
)
# Constraints the converter would not enforce: refused by name.
UNSUPPORTED = frozenset(
    {
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "not",
        "if",
        "then",
        "else",
        "patternProperties",
        "propertyNames",
        "unevaluatedProperties",
        "unevaluatedItems",
        "additionalItems",
        "uniqueItems",
        "contains",
        "minContains",
        "maxContains",
        "minProperties",
        "maxProperties",
        "dependentRequired",
        "dependentSchemas",
        "dependencies",
        "contentEncoding",
        "contentMediaType",
        "contentSchema",
        "$dynamicRef",
        "$anchor",
    }
)
_TYPES = frozenset({"object", "array", "string", "number", "integer", "boolean", "null"})
_FORMATS = frozenset({"date", "time", "date-time", "uuid"})


# The converter's string character admits raw control characters, which JSON does not.
_STRICT_CHAR = 'char ::= [^"\\\\\\x7F\\x00-\\x1F] | "\\\\" (["\\\\/bfnrt] | "u" [0-9a-fA-F]{4})'


class SchemaError(Exception):
    """A schema we cannot enforce; ``str()`` is a fixed message safe to return to the client."""


def _check(schema: Any, depth: int, count: list[int]) -> None:
    if isinstance(schema, bool):
        if schema is False:
            raise SchemaError("a false schema (nothing allowed) is not supported")
        return
    if not isinstance(schema, dict):
        raise SchemaError("every schema must be a JSON object")
    count[0] += 1
    if depth > MAX_DEPTH:
        raise SchemaError(f"the schema is nested deeper than {MAX_DEPTH} levels")
    if count[0] > MAX_NODES:
        raise SchemaError(f"the schema has more than {MAX_NODES} subschemas")
    for key, value in schema.items():
        if key in UNSUPPORTED:
            raise SchemaError(f"the JSON Schema keyword {key!r} is not supported")
        if key in _ANNOTATIONS:
            continue
        if key not in _ENFORCED:
            raise SchemaError("the schema has a keyword that is not supported")
        if key == "type":
            types = value if isinstance(value, list) else [value]
            if not types or not all(isinstance(t, str) and t in _TYPES for t in types):
                raise SchemaError("type must be a JSON Schema type name or a list of them")
        elif key in ("properties", "$defs", "definitions"):
            if not isinstance(value, dict):
                raise SchemaError(f"{key} must be an object")
            for sub in value.values():
                _check(sub, depth + 1, count)
        elif key in ("anyOf", "oneOf", "allOf", "prefixItems"):
            if not isinstance(value, list) or not value:
                raise SchemaError(f"{key} must be a non-empty list")
            for sub in value:
                _check(sub, depth + 1, count)
        elif key == "items":
            for sub in value if isinstance(value, list) else [value]:
                _check(sub, depth + 1, count)
        elif key == "additionalProperties":
            if not isinstance(value, bool):
                _check(value, depth + 1, count)
        elif key == "required":
            if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
                raise SchemaError("required must be a list of property names")
        elif key in ("minItems", "maxItems", "minLength", "maxLength"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise SchemaError(f"{key} must be a non-negative integer")
            if value > MAX_REPEAT:
                raise SchemaError(f"{key} above {MAX_REPEAT} is not supported")
        elif key == "enum":
            if not isinstance(value, list) or not value:
                raise SchemaError("enum must be a non-empty list")
        elif key == "$ref":
            if not isinstance(value, str) or not value.startswith("#/"):
                raise SchemaError("only local references ($ref starting with #/) are supported")
        elif key == "pattern":
            if not isinstance(value, str) or not value.startswith("^") or not value.endswith("$"):
                raise SchemaError("pattern must be a string anchored with ^ and $")
            problem = _pattern_problem(value)
            if problem is not None:
                raise SchemaError(problem)
        elif key == "format":
            if value not in _FORMATS:
                raise SchemaError(
                    "format must be one of " + ", ".join(sorted(_FORMATS)) + " (others are not"
                    " enforced)"
                )
    if "allOf" in schema and schema.get("type", "object") != "object":
        raise SchemaError("allOf is supported for objects only")


def _pattern_problem(pattern: str) -> str | None:
    """What the converter cannot take in ``pattern``, read as the converter reads it: a ``]``
    or ``}`` that closes nothing (it has no branch for those and loops forever on one), or a
    quantifier above MAX_REPEAT (it writes a repeated literal out in full: ``a{99999999}``
    would be a 100 MB string before any limit on the grammar applied)."""
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            i += 2
        elif c == "[":
            i += 1
            while i < len(pattern) and pattern[i] != "]":
                i += 2 if pattern[i] == "\\" else 1
            i += 1
        elif c == "{":
            end = pattern.find("}", i)
            if end < 0:
                return None  # unclosed: the converter refuses it
            for bound in pattern[i + 1 : end].split(","):
                try:
                    if int(bound) > MAX_REPEAT:
                        return f"pattern repetitions above {MAX_REPEAT} are not supported"
                except ValueError:
                    pass  # empty (no bound) or not a number, which the converter refuses
            i = end + 1
        elif c in "]}":
            return "pattern has a ']' or '}' that closes nothing"
        else:
            i += 1
    return None


def check_schema(schema: Any) -> None:
    """Raise ``SchemaError`` unless the converter would enforce all of ``schema``."""
    if len(json.dumps(schema)) > MAX_SCHEMA_BYTES:
        raise SchemaError(f"the schema is larger than {MAX_SCHEMA_BYTES} bytes")
    _check(schema, 0, [0])


class _Grammar:
    """One converter for several schemas, so their rules share one namespace."""

    def __init__(self) -> None:
        self._converter = SchemaConverter(
            prop_order={}, allow_fetch=False, dotall=False, raw_pattern=False
        )
        self.rules: list[str] = []

    def schema_rule(self, schema: Any, name: str) -> str:
        """The name of the rule for ``schema`` (its rules added under the ``name`` prefix)."""
        check_schema(schema)
        schema = json.loads(json.dumps(schema))  # the converter edits what it is given
        if schema is True:
            schema = {}
        try:
            schema = self._converter.resolve_refs(schema, name)
            return str(self._converter.visit(schema, name))
        except (AssertionError, ValueError, LookupError, TypeError, RecursionError, OverflowError):
            raise SchemaError("the schema could not be turned into a grammar") from None

    def text(self) -> str:
        lines = [
            _STRICT_CHAR if line.startswith("char ::= ") else line
            for line in self._converter.format_grammar().split("\n")
        ]
        grammar = "\n".join(lines + self.rules)
        if len(grammar) > MAX_GRAMMAR:
            raise SchemaError("the schema makes a grammar that is too large")
        return grammar


def json_object_grammar() -> str:
    return str(JSON_GBNF)


def json_schema_grammar(schema: Any) -> str:
    grammar = _Grammar()
    root = grammar.schema_rule(schema, "")
    if root != "root":
        grammar.rules.append(f"root ::= {root}")
    return grammar.text()


def _literal(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid GBNF literal


def tool_call_grammar(tools: Sequence[Mapping[str, Any]], style: str, parallel: bool) -> str:
    """Output that is one (or, with ``parallel``, one or more) call of ``tools`` in ``style``.

    ``hermes``: ``<tool_call>{json}</tool_call>`` blocks; ``llama3``: a bare JSON object with
    ``parameters``; ``generic``: ``{"tool_calls": [...]}``; ``harmony``: an optional analysis
    message, then ``<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{args}``
    (the model then ends with ``<|call|>``, its end-of-generation token).
    """
    grammar = _Grammar()
    calls, args = [], []
    arg_key = "parameters" if style == "llama3" else "arguments"
    for i, tool in enumerate(tools):
        function = tool["function"]
        parameters = function.get("parameters") or {"type": "object"}
        rule = grammar.schema_rule(parameters, f"tool{i}-args")
        name = function["name"]
        args.append(f"{_literal(name + ' <|constrain|>json<|message|>')} {rule}")
        calls.append(
            f'"{{" space {_literal(json.dumps("name"))} space ":" space '
            f'{_literal(json.dumps(name))} space "," space '
            f'{_literal(json.dumps(arg_key))} space ":" space {rule} "}}" space'
        )
    grammar.rules.append("call ::= " + " | ".join(f"( {c} )" for c in calls))
    if style == "hermes":
        block = '"<tool_call>" space call "</tool_call>"'
        grammar.rules.append(f"root ::= {block}" + (f" ( space {block} )*" if parallel else ""))
    elif style == "llama3":
        grammar.rules.append("root ::= call" + (' ( ";" space call )*' if parallel else ""))
    elif style == "harmony":  # one call per message: the template renders only the first
        grammar.rules.append(
            'root ::= ( "<|channel|>analysis<|message|>" [^<]* "<|end|><|start|>assistant" )?'
            ' "<|channel|>commentary to=functions." ( '
            + " | ".join(f"( {a} )" for a in args)
            + " )"
        )
    else:
        grammar.rules.append(
            'root ::= "{" space "\\"tool_calls\\"" space ":" space "[" space call'
            + (' ( "," space call )*' if parallel else "")
            + ' "]" space "}" space'
        )
    return grammar.text()
