"""YAML that is safe to load: bounded depth and size, no duplicate keys.

Kept apart from ``ltcp.config`` (which imports it only when a YAML file is
read, and passes its limits) so that workers, which receive configurations
already parsed, never import ``yaml``.
"""

import functools
import reprlib

import yaml

__all__ = ["YamlProblem", "parse"]


class YamlProblem(ValueError):
    """Not YAML, or YAML too big to load; ``message`` is one line: ``source:line:col: what``."""

    def __init__(self, message):
        super().__init__(message)
        self.message = message


def parse(source_text, source, max_depth, max_nodes, max_number_chars):
    """The document in ``source_text``, or YamlProblem."""
    loader = functools.partial(_LimitedLoader, max_depth=max_depth, max_nodes=max_nodes,
                               max_number_chars=max_number_chars)
    try:
        return yaml.load(source_text, Loader=loader)
    except yaml.YAMLError as exc:
        raise YamlProblem(_message(source, exc)) from None


def _message(source, exc):
    mark = getattr(exc, "problem_mark", None)
    where = f"{source}:{mark.line + 1}:{mark.column + 1}" if mark else source
    problem = getattr(exc, "problem", None) or str(exc)
    kind = "refused" if isinstance(exc, _Refused) else "YAML syntax error"
    return f"{where}: {kind}: {problem}"


class _LimitedLoader(yaml.SafeLoader):
    """Safe YAML loading that refuses documents nested too deeply or expanding too far.

    Aliases make a small file stand for a huge value (the "billion laughs"):
    each node's size counts what its aliases expand to, and loading stops as
    soon as the document would exceed ``max_nodes``.
    """

    def __init__(self, stream, max_depth, max_nodes, max_number_chars):
        super().__init__(stream)
        self.max_depth, self.max_nodes, self.max_number_chars = max_depth, max_nodes, max_number_chars
        self._depth = 0
        self._sizes = {}  # id(node) -> expanded size; nodes stay alive until loading ends

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            target = self.anchors.get(self.peek_event().anchor)
            if target is not None and id(target) not in self._sizes:  # an alias inside its own anchor
                self._refuse("an alias refers to a value that contains it")
        self._depth += 1
        try:
            if self._depth > self.max_depth:
                self._refuse(f"nested more than {self.max_depth} levels deep")
            node = super().compose_node(parent, index)
        finally:
            self._depth -= 1
        if id(node) not in self._sizes:
            self._sizes[id(node)] = self._size(node)
        if self._sizes[id(node)] > self.max_nodes:
            self._refuse(f"expands to more than {self.max_nodes} values (YAML aliases)")
        return node

    def _size(self, node):
        if isinstance(node, yaml.ScalarNode):
            if node.tag in (_INT_TAG, _FLOAT_TAG) and len(node.value) > self.max_number_chars:
                self._refuse(f"a number longer than {self.max_number_chars} characters", node.start_mark)
            return 1
        if isinstance(node, yaml.SequenceNode):
            return 1 + sum(self._sizes[id(child)] for child in node.value)
        return 1 + sum(self._sizes[id(key)] + self._sizes[id(value)] for key, value in node.value)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value != "<<":
                if key_node.value in seen:
                    self._refuse(f"duplicate key {reprlib.repr(key_node.value)}", key_node.start_mark)
                seen.add(key_node.value)
        return super().construct_mapping(node, deep)

    def _refuse(self, problem, mark=None):
        raise _Refused(None, None, problem, mark or self.peek_event().start_mark)

class _Refused(yaml.MarkedYAMLError):
    """Well-formed YAML that ltcp will not load (too deep, too big): not a syntax error."""

_INT_TAG, _FLOAT_TAG = "tag:yaml.org,2002:int", "tag:yaml.org,2002:float"
