"""ClickHouse's Native format as a server writes it for a given ``client_protocol_version``.

chdb writes Native blocks the way a server does for protocol revision 0 (a plain HTTP client):
per block the column and row counts, then per column its name, type and data. A client that
sends ``client_protocol_version`` (clickhouse-go v2 over HTTP, and so Grafana's ClickHouse
plugin) expects what a server writes for that revision: a BlockInfo header before each block
(revision > 0) and, after each column's type, a byte saying whether the column has a custom
(e.g. sparse) serialization (revision >= 54454). chdb cannot be told the revision, so
`with_protocol_revision` adds those bytes, walking the blocks: to find where one column's data
ends and the next column starts it reads the data's layout (never its values) by type.
"""

from __future__ import annotations

import re

# DBMS_MIN_REVISION_WITH_CUSTOM_SERIALIZATION in ClickHouse.
CUSTOM_SERIALIZATION_REVISION = 54454

# BlockInfo as a server writes it: field 1 is_overflows = false, field 2 bucket_num = -1, end.
_BLOCK_INFO = b"\x01\x00\x02\xff\xff\xff\xff\x00"

_FIXED_SIZES = {
    "UInt8": 1,
    "Int8": 1,
    "Bool": 1,
    "Enum8": 1,
    "Nothing": 1,
    "UInt16": 2,
    "Int16": 2,
    "Date": 2,
    "Enum16": 2,
    "BFloat16": 2,
    "UInt32": 4,
    "Int32": 4,
    "Float32": 4,
    "DateTime": 4,
    "Date32": 4,
    "IPv4": 4,
    "Time": 4,
    "Decimal32": 4,
    "UInt64": 8,
    "Int64": 8,
    "Float64": 8,
    "DateTime64": 8,
    "Time64": 8,
    "Decimal64": 8,
    "UInt128": 16,
    "Int128": 16,
    "UUID": 16,
    "IPv6": 16,
    "Decimal128": 16,
    "UInt256": 32,
    "Int256": 32,
    "Decimal256": 32,
}

_NAMED_ELEMENT = re.compile(r"^(`(?:[^`]|``)*`|[A-Za-z_][A-Za-z0-9_.]*)\s+(\S.*)$", re.DOTALL)


class NativeFormatError(ValueError):
    """The Native stream holds a type whose layout this module does not know."""


def split_type(type_name: str) -> tuple[str, list[str]]:
    """``Map(String, Array(UInt8))`` -> (``Map``, [``String``, ``Array(UInt8)``])."""
    type_name = type_name.strip()
    open_at = type_name.find("(")
    if open_at < 0 or not type_name.endswith(")"):
        return type_name, []
    name, inner = type_name[:open_at], type_name[open_at + 1 : -1]
    args: list[str] = []
    depth, start, quote = 0, 0, ""
    i = 0
    while i < len(inner):
        ch = inner[i]
        if quote:
            if ch == "\\":
                i += 1
            elif ch == quote:
                quote = ""
        elif ch in "'`\"":
            quote = ch
        elif ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        elif ch == "," and depth == 0:
            args.append(inner[start:i].strip())
            start = i + 1
        i += 1
    args.append(inner[start:].strip())
    return name, args


def _element_type(arg: str) -> str:
    """A Tuple element without its name: ``a String`` -> ``String``."""
    match = _NAMED_ELEMENT.match(arg)
    if match and "(" not in match.group(1):
        return match.group(2)
    return arg


class _Reader:
    def __init__(self, data: bytes, pos: int = 0) -> None:
        self.data = data
        self.pos = pos

    def take(self, size: int) -> bytes:
        end = self.pos + size
        if end > len(self.data):
            raise NativeFormatError("truncated Native stream")
        chunk = self.data[self.pos : end]
        self.pos = end
        return chunk

    def varuint(self) -> int:
        shift = result = 0
        while True:
            byte = self.take(1)[0]
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7

    def uint64(self) -> int:
        return int.from_bytes(self.take(8), "little")

    def string(self) -> bytes:
        return self.take(self.varuint())

    # --- column layouts (ClickHouse's serializeBinaryBulk per type) ---------------------------

    def skip_prefix(self, type_name: str) -> None:
        """Skip the state prefixes a column writes before its data (LowCardinality's version)."""
        name, args = split_type(type_name)
        if name == "LowCardinality":
            self.take(8)
        elif name in ("Array", "Nullable", "SimpleAggregateFunction", "Nested", "Tuple", "Map"):
            for arg in self._children(name, args):
                self.skip_prefix(arg)

    def _children(self, name: str, args: list[str]) -> list[str]:
        if name == "SimpleAggregateFunction":
            return args[1:]
        if name in ("Tuple", "Nested", "Map"):
            return [_element_type(a) for a in args]
        return args

    def skip_data(self, type_name: str, rows: int) -> None:
        name, args = split_type(type_name)
        if name in _FIXED_SIZES:
            self.take(_FIXED_SIZES[name] * rows)
        elif name in ("String", "JSONString"):
            for _ in range(rows):
                self.take(self.varuint())
        elif name == "FixedString":
            self.take(int(args[0]) * rows)
        elif name == "Decimal":
            precision = int(args[0])
            size = 4 if precision <= 9 else 8 if precision <= 18 else 16 if precision <= 38 else 32
            self.take(size * rows)
        elif name == "Nullable":
            self.take(rows)
            self.skip_data(args[0], rows)
        elif name == "SimpleAggregateFunction":
            self.skip_data(args[-1], rows)
        elif name in ("Array", "Map", "Nested"):
            offsets = self.take(8 * rows)
            total = int.from_bytes(offsets[-8:], "little") if rows else 0
            if name == "Array":
                self.skip_data(args[0], total)
            else:
                for arg in self._children(name, args):
                    self.skip_data(arg, total)
        elif name == "Tuple":
            for arg in self._children(name, args):
                self.skip_data(arg, rows)
        elif name == "LowCardinality":
            self._skip_low_cardinality(args[0], rows)
        else:
            raise NativeFormatError(
                f"type {type_name} in Native output for a client_protocol_version client is not "
                "supported by this endpoint; cast the column (e.g. toString) or use another format"
            )

    def _skip_low_cardinality(self, inner: str, rows: int) -> None:
        # Keys are the dictionary's type: the inner type without Nullable.
        key_name, key_args = split_type(inner)
        key_type = key_args[0] if key_name == "Nullable" else inner
        done = 0
        while done < rows:
            flags = self.uint64()
            if flags & (1 << 9):  # has additional keys
                self.skip_data(key_type, self.uint64())
            count = self.uint64()
            self.take(count * (1 << (flags & 0xFF)))
            done += count


def with_protocol_revision(native: bytes, revision: int) -> bytes:
    """``native`` (as chdb writes it, revision 0) as a server writes it for ``revision``."""
    if revision <= 0 or not native:
        return native
    reader = _Reader(native)
    out = bytearray()
    while reader.pos < len(native):
        start = reader.pos
        columns = reader.varuint()
        rows = reader.varuint()
        out += _BLOCK_INFO
        out += native[start : reader.pos]
        for _ in range(columns):
            start = reader.pos
            reader.string()  # name
            type_name = reader.string().decode()
            out += native[start : reader.pos]
            if revision >= CUSTOM_SERIALIZATION_REVISION:
                out += b"\x00"  # no custom serialization: chdb writes every column in full
            start = reader.pos
            if rows:
                reader.skip_prefix(type_name)
                reader.skip_data(type_name, rows)
            out += native[start : reader.pos]
    return bytes(out)


def block_with_protocol_revision(block: bytes, revision: int) -> bytes:
    """One block (as chdb streams them: one block per chunk) as a server writes it for
    ``revision``. Below the custom-serialization revision only the BlockInfo header is new, so
    nothing is walked: every type passes through as written (clickhouse-connect asks for 54405,
    and reads Variant, Dynamic and JSON columns this way)."""
    if revision <= 0 or not block:
        return block
    if revision < CUSTOM_SERIALIZATION_REVISION:
        return _BLOCK_INFO + block
    return with_protocol_revision(block, revision)
