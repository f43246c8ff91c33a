"""What a JSON schema may ask of the grammar engine, checked before anything is compiled.

- **Cost.** Compiling a schema costs time roughly in the square of an object's optional
  properties (measured here: 1,000 take 0.1 s, 2,000 take 0.4 s, 4,000 took 5.8 s under
  load), and a compile cannot be stopped once it runs. So an object may have at most
  `MAX_OPTIONAL_PROPERTIES` optional properties and a schema at most `MAX_PROPERTIES` in all
  (OpenAI's own limit for structured outputs). The largest schemas the SDKs produce (strict
  mode: every property required; ten levels of fifty fields) compile in 10-30 ms, and 5,000
  required properties in 0.3 s.
- **What can be enforced.** llguidance holds integers in 64 bits: an integer bound beyond that
  range would silently become another bound, so it is refused.
- **Whether an answer can end.** A `$ref` cycle with no way out (a definition that must
  contain itself) has no finite value: the model could never finish one.

Violations raise `InvalidInput` naming the request field. The depth of a schema is bounded
before it gets here (the server refuses more than 64 levels), so recursion is safe.
"""

from __future__ import annotations

from typing import Any

from inference.errors import InvalidInput

MAX_OPTIONAL_PROPERTIES = 1000
MAX_PROPERTIES = 5000
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
_BOUNDS = ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")
_CHILD_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_CHILD_MAPS = ("properties", "$defs", "definitions", "patternProperties")
_CHILDREN = ("items", "additionalProperties", "not", "contains", "if", "then", "else")


def check_schema(schema: Any, *, param: str) -> None:
    """Refuse a schema that would cost more than the budget to compile, bounds the grammar
    engine cannot hold, or a `$ref` cycle no answer can leave."""
    total = 0
    for sub in _subschemas(schema):
        props = sub.get("properties")
        if isinstance(props, dict):
            total += len(props)
            optional = len(set(props) - _required(sub))
            if optional > MAX_OPTIONAL_PROPERTIES:
                raise InvalidInput(
                    f"an object in the schema has {optional} optional properties; this server "
                    f"compiles at most {MAX_OPTIONAL_PROPERTIES} per object (its compile-time "
                    "budget): list them in `required`, or split the object", param=param)
        if _types(sub) & {"integer"}:
            for bound in _BOUNDS:
                value = sub.get(bound)
                if isinstance(value, int | float) and not isinstance(value, bool) \
                        and not INT64_MIN <= value <= INT64_MAX:
                    raise InvalidInput(
                        f"the integer bound {bound}={value} lies outside what the grammar engine "
                        f"can enforce ({INT64_MIN}..{INT64_MAX})", param=param)
    if total > MAX_PROPERTIES:
        raise InvalidInput(f"the schema has {total} properties; this server compiles at most "
                           f"{MAX_PROPERTIES} (its compile-time budget)", param=param)
    if not _can_end(schema):
        raise InvalidInput("the schema has no finite value: a $ref cycle with no way out "
                           "(a definition that must contain itself), so no answer could ever "
                           "be complete", param=param)


def _subschemas(schema: Any) -> list[dict[str, Any]]:
    """Every schema object within `schema`, itself included."""
    found: list[dict[str, Any]] = []
    stack = [schema]
    while stack:
        sub = stack.pop()
        if not isinstance(sub, dict):
            continue
        found.append(sub)
        for key in _CHILD_LISTS:
            if isinstance(sub.get(key), list):
                stack.extend(sub[key])
        for key in _CHILD_MAPS:
            if isinstance(sub.get(key), dict):
                stack.extend(sub[key].values())
        stack.extend(sub.get(key) for key in _CHILDREN)
    return found


def _types(sub: dict[str, Any]) -> set[str]:
    kind = sub.get("type")
    if isinstance(kind, str):
        return {kind}
    if isinstance(kind, list):
        return {t for t in kind if isinstance(t, str)}
    return set()


def _required(sub: dict[str, Any]) -> set[str]:
    """The names an object schema requires (a client may send anything in the list)."""
    names = sub.get("required")
    return {n for n in names if isinstance(n, str)} if isinstance(names, list) else set()


def _can_end(root: Any) -> bool:
    """Whether `root` has a finite value: the least fixed point over its `$ref` targets (a
    target counts as ending once some value of it is known to be finite)."""
    targets: dict[str, Any] = {"#": root}
    if isinstance(root, dict):
        for key in ("$defs", "definitions"):
            if isinstance(root.get(key), dict):
                targets.update({f"#/{key}/{name}": sub for name, sub in root[key].items()})
    ends = dict.fromkeys(targets, False)
    changed = True
    while changed:
        changed = False
        for ref, sub in targets.items():
            if not ends[ref] and _ends(sub, ends):
                ends[ref] = changed = True
    return ends["#"]


def _ends(sub: Any, ends: dict[str, bool]) -> bool:
    """Whether `sub` has a finite value, given which `$ref` targets are known to."""
    if isinstance(sub, bool):
        return sub
    if not isinstance(sub, dict):
        return True
    ref = sub.get("$ref")
    if isinstance(ref, str) and ref in ends and not ends[ref]:
        return False  # a target not (yet) known to end; other forms of $ref are not judged
    if isinstance(sub.get("anyOf"), list) and not any(_ends(s, ends) for s in sub["anyOf"]):
        return False
    if isinstance(sub.get("oneOf"), list) and not any(_ends(s, ends) for s in sub["oneOf"]):
        return False
    if isinstance(sub.get("allOf"), list) and not all(_ends(s, ends) for s in sub["allOf"]):
        return False
    if "enum" in sub or "const" in sub:
        return True
    kinds = _types(sub)
    if not kinds and isinstance(sub.get("properties"), dict):
        kinds = {"object"}
    if not kinds:
        return True
    return any(_kind_ends(kind, sub, ends) for kind in kinds)


def _kind_ends(kind: str, sub: dict[str, Any], ends: dict[str, bool]) -> bool:
    if kind == "object":
        props = sub.get("properties")
        if not isinstance(props, dict):
            return True
        return all(_ends(props[name], ends) for name in _required(sub) if name in props)
    if kind == "array":
        least = sub.get("minItems", 0)
        return not (isinstance(least, int) and least > 0) or _ends(sub.get("items", True), ends)
    return True
