"""Minimal pytrees: nested tuple/list/dict containers with arbitrary leaves.

gradserve needs only ``flatten``/``unflatten`` to hand a pytree's tensors to an
autograd node and put them back; static leaves (None, bool, int, float, str)
stay inside the structure. The recursion lives in module-level functions (not
self-referencing closures) so that no reference cycle keeps a tensor alive.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterator


@dataclass(frozen=True)
class TreeDef:
    """The structure of a pytree with its array leaves taken out.

    Static leaves compare by type and exact value (``1``, ``1.0`` and ``True``
    differ, so do ``0.0`` and ``-0.0``): tree definitions are cache keys.
    """

    kind: str                       # "leaf", "static", "tuple", "named", "list", "dict"
    children: tuple["TreeDef", ...] = ()
    keys: tuple[str, ...] = ()
    value: Any = field(default=None, compare=False)   # the static leaf, or the named type
    static_key: tuple[str, str] = ("", "")

    @property
    def num_leaves(self) -> int:
        """How many array leaves the structure holds."""
        if self.kind == "leaf":
            return 1
        return sum(child.num_leaves for child in self.children)


_LEAF = TreeDef("leaf")


def named_fields(cls: type) -> tuple[str, ...] | None:
    """The field names of a named tuple type (a ``namedtuple``, or a struct sequence such
    as ``torch.return_types.max`` with no hidden fields), else None."""
    if not issubclass(cls, tuple) or cls is tuple:
        return None
    fields = getattr(cls, "_fields", None)
    if fields is None and getattr(cls, "n_fields", -1) == getattr(cls, "n_sequence_fields", -2):
        fields = getattr(cls, "__match_args__", None)
    return tuple(fields) if fields is not None else None


def make_named(cls: type, items: list[Any]) -> Any:
    """An instance of named tuple type ``cls`` holding ``items``."""
    return cls._make(items) if hasattr(cls, "_make") else cls(items)


def _static(value: Any) -> TreeDef:
    key = (type(value).__qualname__, repr(value))
    try:
        hash(value)
    except TypeError:
        key = (type(value).__qualname__, f"id:{id(value)}")
    return TreeDef("static", value=value, static_key=key)


def _walk(node: Any, is_leaf: Callable[[Any], bool], leaves: list[Any]) -> TreeDef:
    if is_leaf(node):
        leaves.append(node)
        return _LEAF
    if isinstance(node, dict):
        keys = tuple(node)
        return TreeDef("dict", tuple(_walk(node[k], is_leaf, leaves) for k in keys), keys)
    if isinstance(node, (tuple, list)):
        children = tuple(_walk(item, is_leaf, leaves) for item in node)
        fields = named_fields(type(node)) if type(node) not in (tuple, list) else None
        if fields is not None:
            cls = type(node)
            return TreeDef("named", children, fields, cls,
                           (f"{cls.__module__}.{cls.__qualname__}", ""))
        return TreeDef("list" if type(node) is list else "tuple", children)
    return _static(node)


def flatten(tree: Any, is_leaf: Callable[[Any], bool]) -> tuple[list[Any], TreeDef]:
    """Split ``tree`` into the list of leaves for which ``is_leaf`` holds and its structure."""
    leaves: list[Any] = []
    treedef = _walk(tree, is_leaf, leaves)
    return leaves, treedef


def _build(td: TreeDef, it: Iterator[Any]) -> Any:
    if td.kind == "leaf":
        return next(it)
    if td.kind == "static":
        return td.value
    items = [_build(child, it) for child in td.children]
    if td.kind == "dict":
        return dict(zip(td.keys, items))
    if td.kind == "named":
        return make_named(td.value, items)
    return tuple(items) if td.kind == "tuple" else items


def unflatten(treedef: TreeDef, leaves: Iterator[Any] | list[Any]) -> Any:
    """Rebuild a pytree from ``treedef`` and its leaves, in flatten order."""
    return _build(treedef, iter(leaves))


def flatten_up_to(treedef: TreeDef, tree: Any, path: str = "") -> list[Any]:
    """The nodes of ``tree`` at ``treedef``'s leaf positions (static positions are skipped).

    Raises ValueError naming the first place where ``tree``'s containers differ.
    """
    if treedef.kind == "leaf":
        return [tree]
    if treedef.kind == "static":
        return []
    where = path or "the tree"
    if treedef.kind == "dict":
        if not isinstance(tree, dict) or set(tree) != set(treedef.keys):
            got = sorted(tree) if isinstance(tree, dict) else type(tree).__name__
            raise ValueError(f"{where}: expected a dict with keys {sorted(treedef.keys)}, got {got}")
        items = [tree[k] for k in treedef.keys]
        paths = [f"{path}[{k!r}]" for k in treedef.keys]
    else:
        if not isinstance(tree, (tuple, list)) or len(tree) != len(treedef.children):
            got = f"{type(tree).__name__} of length {len(tree)}" if isinstance(tree, (tuple, list)) \
                else type(tree).__name__
            raise ValueError(f"{where}: expected a sequence of length {len(treedef.children)}, got {got}")
        items = list(tree)
        paths = [f"{path}[{i}]" for i in range(len(items))]
    out: list[Any] = []
    for child, item, sub in zip(treedef.children, items, paths):
        out.extend(flatten_up_to(child, item, sub))
    return out


def map_leaves(fn: Callable[[Any], Any], tree: Any, is_leaf: Callable[[Any], bool]) -> Any:
    """Apply ``fn`` to every leaf for which ``is_leaf`` holds."""
    leaves, treedef = flatten(tree, is_leaf)
    return unflatten(treedef, [fn(leaf) for leaf in leaves])


def flatten_with_paths(tree: Any, is_leaf: Callable[[Any], bool],
                       path: str = "") -> list[tuple[str, Any]]:
    """The leaves for which ``is_leaf`` holds, each with its path such as ``['a'][0]``."""
    if is_leaf(tree):
        return [(path, tree)]
    if isinstance(tree, dict):
        items = [(f"{path}[{k!r}]", v) for k, v in tree.items()]
    elif isinstance(tree, (tuple, list)):
        items = [(f"{path}[{i}]", v) for i, v in enumerate(tree)]
    else:
        return []
    return [found for sub, item in items for found in flatten_with_paths(item, is_leaf, sub)]
