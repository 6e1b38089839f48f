"""Redis Lua scripts kept in ``.lua`` files and called with named keys and arguments.

A script lives in ``<package>/lua/<name>.lua`` (package data, see ``pyproject.toml``), optionally
after shared helper files of the same folder (concatenated in order: the helpers define ``local
function``\\ s the script calls). Its first lines name its keys and arguments::

    local stream, dead_letters = unpack(KEYS)
    local group, topic = unpack(ARGV)

and its ``LuaScriptSpec`` names them again, as the fields of two ``NamedTuple`` classes (a
named record that *is* the positional list, so building the call costs nothing more). A script
whose KEYS / ARGV go on past a fixed head (``engagement_batch.lua``: per event, post, author, user)
names the head with ``unpack(KEYS, 1, n)``, checked the same way, and has a wrapper that lays out
the rest.
``LuaScriptSpec`` checks at load that both lists agree (so a key added on one side fails at
start-up, not as a wrong positional argument), and ``LuaScript.__call__`` passes the records as
KEYS / ARGV: callers never index ``KEYS[14]``. A script with a variable number of keys
(``window_sums.lua``) declares no such line and has its own small wrapper.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Sequence

_DECL = re.compile(r"^local\s+([A-Za-z_][\w\s,]*?)\s*=\s*unpack\((KEYS|ARGV)(?:\s*,\s*1\s*,\s*(\d+))?\)",
                   re.MULTILINE)


def lua_source(package: str, name: str, helpers: Sequence[str] = ()) -> str:
    """The text of ``<package>/lua/<name>``, after the helper files of the same folder, in order.

    Raises:
        FileNotFoundError: a file is missing (package data not installed?).
    """
    folder = resources.files(package).joinpath("lua")
    return "".join(folder.joinpath(f).read_text(encoding="utf-8") for f in (*helpers, name))


def declared_names(source: str, which: str) -> tuple[str, ...] | None:
    """The names of ``local a, b = unpack(KEYS)`` (``which="KEYS"``) or ``unpack(ARGV)`` in ``source``
    (``None`` if it has no such line). A head form ``unpack(KEYS, 1, n)`` must name ``n`` values.

    Raises:
        ValueError: a head form names another number of values than ``n``.
    """
    for m in _DECL.finditer(source):
        if m.group(2) == which:
            names = tuple(n.strip() for n in m.group(1).split(","))
            if m.group(3) is not None and int(m.group(3)) != len(names):
                raise ValueError(f"unpack({which}, 1, {m.group(3)}) assigned to {len(names)} names: {list(names)}")
            return names
    return None


def _field_names(cls: type | None) -> tuple[str, ...]:
    return () if cls is None else tuple(cls._fields)


@dataclass(frozen=True)
class LuaScriptSpec:
    """Where a script is and which named KEYS / ARGV it takes.

    Args:
        package: the package holding the ``lua/`` folder, e.g. ``"pipelines.streaming"``.
        name: the script's file name in it.
        keys: ``NamedTuple`` class whose fields, in order, are the script's KEYS (``None``: no keys).
        args: ``NamedTuple`` class whose fields, in order, are the script's ARGV (``None``: no args).
        helpers: helper files of the same folder, prepended in order.
    """

    package: str
    name: str
    keys: type | None
    args: type | None
    helpers: tuple[str, ...] = ()

    @property
    def source(self) -> str:
        """The script's full text (helpers first)."""
        return lua_source(self.package, self.name, self.helpers)

    def check(self, source: str | None = None) -> str:
        """``source`` (default: the files' text) after checking that its ``unpack(KEYS)`` /
        ``unpack(ARGV)`` names equal the records' fields.

        Raises:
            ValueError: they differ.
        """
        source = self.source if source is None else source
        for which, cls in (("KEYS", self.keys), ("ARGV", self.args)):
            want, got = _field_names(cls), declared_names(source, which) or ()
            if want != got:
                raise ValueError(f"{self.package}/lua/{self.name}: unpack({which}) names {list(got)} differ from "
                                 f"{cls.__name__ if cls else None} fields {list(want)}; keep them in one order")
        return source

    def register(self, client, source: str | None = None) -> "LuaScript":
        """Load (check + ``register_script``) on ``client``; ``source`` replaces the file's text
        (a benchmark's variant), with the same KEYS / ARGV. On a Redis Cluster the script is also
        loaded on every primary at once (``SCRIPT LOAD``): a cluster pipeline queues the
        ``EVALSHA`` as is (:class:`LuaScript`), without redis-py's load-on-``NoScriptError``."""
        from core.online_store import is_cluster

        script = client.register_script(self.check(source))
        if is_cluster(client):
            client.script_load(script.script)
        return LuaScript(self, script)


class LuaScript:
    """A registered script, called with a keys and an args record of its spec.

    ``script(keys, args, client=pipe)`` queues it on a pipeline (or runs it on ``client``, default
    the client it was registered on) and returns what redis-py's ``Script`` returns. redis-py
    refuses ``Script`` calls on a cluster pipeline (``ClusterPipeline.evalsha`` is blocked), so there
    the ``EVALSHA`` is queued as a plain command, routed by its keys' slot (one slot: the layout's
    hash tags).
    """

    def __init__(self, spec: LuaScriptSpec, script):
        self.spec, self.script = spec, script

    def __call__(self, keys: tuple | None = None, args: tuple | None = None, client=None) -> Any:
        """Run with ``keys`` / ``args``: instances of the spec's ``keys`` / ``args`` records.

        Raises:
            TypeError: a record of another class (its fields would land in the wrong positions).
        """
        for rec, cls in ((keys, self.spec.keys), (args, self.spec.args)):
            if type(rec) is not cls and not (rec is None and cls is None):
                raise TypeError(f"{self.spec.name}: expected a {getattr(cls, '__name__', None)}, "
                                f"got {type(rec).__name__}")
        from redis.cluster import ClusterPipeline

        if isinstance(client, ClusterPipeline):
            return queue_evalsha(client, self.script.sha, tuple(keys or ()), tuple(args or ()))
        return self.script(keys=keys, args=args, client=client)


def queue_evalsha(pipe, sha: str, keys: Sequence, args: Sequence):
    """Queue ``EVALSHA sha len(keys) *keys *args`` on ``pipe``; on a cluster pipeline (redis-py's
    ``ClusterPipeline``) with the primary of the first key's slot as its target.

    Why the target: redis-py 7's cluster pipeline resolves the routing of a command it has no
    policy for (EVALSHA among them) with a ``COMMAND GETKEYS`` round trip to a node per queued
    command, which cost more than the scripts themselves (measured: 4,210 extra round trips for 40
    batches). The keys of one call share a slot (the layout's hash tags), so the first key's slot
    names the node; a ``MOVED`` reply (a resharded slot) is followed by redis-py as usual.

    Raises:
        ValueError: a cluster call without keys (it would have no slot).
    """
    from redis.cluster import ClusterPipeline
    from redis.crc import key_slot

    if not isinstance(pipe, ClusterPipeline):
        return pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args)
    if not keys:
        raise ValueError("a script call on a Redis Cluster needs a key to route it by")
    key = keys[0] if isinstance(keys[0], bytes) else str(keys[0]).encode()
    node = pipe.nodes_manager.get_node_from_slot(key_slot(key))
    return pipe.execute_command("EVALSHA", sha, len(keys), *keys, *args, target_nodes=node)
