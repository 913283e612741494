"""What a checkpoint or model folder's files must look like, checked before anything in them is used.

One layer for every structured file pytrain reads from such a folder: JSON files (manifest.json, the
completion marker, state.json, a Hugging Face index) are parsed with duplicate keys refused and checked
against a schema; a safetensors file's header is parsed here and checked against the file it heads (known
dtypes, shapes whose bytes are exactly the data offsets, offsets that tile the data) before safetensors
opens it. So a damaged or hand-edited file is a CheckpointError naming the file and the field, never a
KeyError, a SafetensorError, an allocation the size of a made-up shape, or a silently wrong tensor.

A schema is built from the classes below: Int, Text, OneOf, Nullable, ListOf, MapOf and Record (a JSON
object with required and optional fields; other fields are allowed, as a newer writer may add some).
"""

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .storage import SAFETENSORS_DTYPES, CheckpointError

SAFETENSORS_TORCH = {code: dtype for dtype, code in SAFETENSORS_DTYPES.items()}
MAX_SAFETENSORS_HEADER = 100_000_000  # safetensors' own limit on the header's JSON
METADATA = "__metadata__"


def _show(value) -> str:
    text = json.dumps(value) if isinstance(value, (dict, list, str, int, float, bool, type(None))) else repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _at(where: str) -> str:
    return where or "the whole file"


@dataclass(frozen=True)
class Int:
    minimum: int = 0

    def problem(self, value, where: str) -> str | None:
        if type(value) is not int or value < self.minimum:  # type(): a JSON `true` is no integer
            return f"{_at(where)} must be an integer >= {self.minimum}, not {_show(value)}"
        return None


@dataclass(frozen=True)
class Text:
    length: int | None = None  # an exact length (a sha256 digest: 64)

    def problem(self, value, where: str) -> str | None:
        if not isinstance(value, str) or (self.length is not None and len(value) != self.length):
            size = f" of {self.length} characters" if self.length is not None else ""
            return f"{_at(where)} must be a string{size}, not {_show(value)}"
        return None


@dataclass(frozen=True)
class OneOf:
    choices: tuple

    def problem(self, value, where: str) -> str | None:
        if isinstance(value, bool) or value not in self.choices:
            return f"{_at(where)} must be one of {', '.join(map(_show, self.choices))}, not {_show(value)}"
        return None


@dataclass(frozen=True)
class Nullable:
    inner: object

    def problem(self, value, where: str) -> str | None:
        return None if value is None else self.inner.problem(value, where)


@dataclass(frozen=True)
class ListOf:
    item: object
    length: int | None = None

    def problem(self, value, where: str) -> str | None:
        if not isinstance(value, list) or (self.length is not None and len(value) != self.length):
            size = f" of {self.length}" if self.length is not None else ""
            return f"{_at(where)} must be a list{size}, not {_show(value)}"
        return next((p for i, v in enumerate(value) if (p := self.item.problem(v, f"{where}[{i}]"))), None)


@dataclass(frozen=True)
class MapOf:
    value: object

    def problem(self, value, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{_at(where)} must be an object, not {_show(value)}"
        return next((p for k, v in value.items() if (p := self.value.problem(v, f"{where}[{k!r}]"))), None)


@dataclass(frozen=True)
class Record:
    required: dict
    optional: dict = field(default_factory=dict)

    def problem(self, value, where: str) -> str | None:
        if not isinstance(value, dict):
            return f"{_at(where)} must be an object, not {_show(value)}"
        missing = [name for name in self.required if name not in value]
        if missing:
            return f"{_at(where)} lacks {', '.join(map(repr, missing))}"
        fields = {**self.required, **{k: v for k, v in self.optional.items() if k in value}}
        return next((p for k, s in fields.items() if (p := s.problem(value[k], f"{where}.{k}".lstrip(".")))), None)


def check(value, schema, what: str) -> None:
    """Raises a CheckpointError naming `what` (the file) and the first field that does not fit."""
    problem = schema.problem(value, "")
    if problem is not None:
        raise CheckpointError(f"{what} is not valid: {problem}")


def _unique_keys(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise ValueError(f"the key {key!r} appears twice")
        seen.add(key)
    return dict(pairs)


def load_json(data: bytes, what: str, schema=None):
    """The JSON value of a file's bytes (duplicate keys refused: which one counts is a reader's guess),
    checked against `schema` when given."""
    try:
        value = json.loads(data.decode("utf-8"), object_pairs_hook=_unique_keys)
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError is a ValueError
        raise CheckpointError(f"{what} is corrupt: not valid JSON ({err})") from None
    if schema is not None:
        check(value, schema, what)
    return value


JSON_OBJECT = Record({})
SHA256 = Text(64)
DTYPE_NAMES = tuple(str(dtype).removeprefix("torch.") for dtype in SAFETENSORS_DTYPES)
SHAPE = ListOf(Int())
MARKER = Record({"step": Int(), "manifest_sha256": SHA256})
MANIFEST = Record(
    {
        "format": Text(),
        "format_version": Int(),
        "step": Int(),
        "world_size": Int(1),
        "files": MapOf(Record({"bytes": Int(), "sha256": SHA256})),
        "tensors": MapOf(
            Record(
                {
                    "shape": SHAPE,
                    "dtype": OneOf(DTYPE_NAMES),
                    "shards": ListOf(
                        Record(
                            {"file": Text(), "dim": Nullable(Int()), "pieces": ListOf(ListOf(Int(), 2))},
                            {"rows": ListOf(Int(), 2)},
                        )
                    ),
                }
            )
        ),
    }
)
HF_INDEX = Record({"weight_map": MapOf(Text())})
SAFETENSORS_ENTRY = Record({"dtype": OneOf(tuple(SAFETENSORS_TORCH)), "shape": SHAPE, "data_offsets": ListOf(Int(), 2)})


@dataclass(frozen=True)
class TensorHeader:
    dtype: torch.dtype
    shape: tuple[int, ...]


def read_safetensors_header(path: Path, what: str | None = None) -> dict[str, TensorHeader]:
    """Each tensor's dtype and shape from a safetensors file's header, checked against the file: the
    header fits the file, every entry has a known dtype, and its bytes (shape x dtype size) are exactly its
    data offsets, which tile the data that follows the header without gap or overlap."""
    what = what or str(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little") if size >= 8 else None
        if length is None or length > min(size - 8, MAX_SAFETENSORS_HEADER):
            claim = "no 8-byte header size" if length is None else f"a header of {length} bytes"
            raise CheckpointError(f"{what} is not a valid safetensors file: {size} bytes holding {claim}")
        header = load_json(f.read(length), what)
    if not isinstance(header, dict):
        raise CheckpointError(f"{what} is not valid: its safetensors header is not a JSON object")
    check(header.get(METADATA, {}), Nullable(MapOf(Text())), f"{what} (__metadata__)")
    entries = {name: entry for name, entry in header.items() if name != METADATA}
    check(entries, MapOf(SAFETENSORS_ENTRY), what)
    tensors, end = {}, 0
    for name, entry in sorted(entries.items(), key=lambda item: item[1]["data_offsets"]):
        dtype, shape, (start, stop) = SAFETENSORS_TORCH[entry["dtype"]], tuple(entry["shape"]), entry["data_offsets"]
        numel = 1
        for n in shape:
            numel *= n
        if start != end or stop - start != numel * dtype.itemsize:
            raise CheckpointError(
                f"{what} is not valid: {name!r} ({entry['dtype']} {list(shape)}, {numel * dtype.itemsize} bytes) has "
                f"data offsets [{start}, {stop}], expected [{end}, {end + numel * dtype.itemsize}]"
            )
        tensors[name], end = TensorHeader(dtype, shape), stop
    if end != size - 8 - length:
        raise CheckpointError(
            f"{what} is not valid: its tensors hold {end} bytes, the file {size - 8 - length} after its header"
        )
    return tensors


def open_safetensors(path: Path, what: str | None = None):
    """(safetensors' handle of the file, its checked header): read_safetensors_header first, so safetensors
    only ever opens a file whose header is known to be sound."""
    headers = read_safetensors_header(path, what)
    return open_checked_safetensors(path, what), headers


def open_checked_safetensors(path: Path, what: str | None = None):
    """safetensors' handle of a file whose header read_safetensors_header has already checked."""
    try:
        return safe_open(str(path), framework="pt")
    except SafetensorError as err:
        raise CheckpointError(f"{what or path} is not a valid safetensors file: {err}") from None
