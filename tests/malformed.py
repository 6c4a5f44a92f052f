"""Builders of malformed adapter folders for tests/serving/test_bad_input.py: each copies a good
adapter
and breaks one thing (config fields, tensors, the safetensors header bytes, the folder layout,
symlinks out of an allowed root). A builder takes a `Src` and returns the path to load."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

WEIGHTS = "flora_model.safetensors"
LORA_WEIGHTS = "adapter_model.safetensors"
CONFIG = "adapter_config.json"


@dataclass(frozen=True)
class Src:
    """What a builder may use: `tmp` (a fresh path to build the adapter at), good FLoRA and LoRA
    adapter folders, and `outside` (a good adapter outside the allowed roots, if any)."""

    tmp: str
    flora: str
    lora: str
    outside: str = ""


def copy(src: str, dst: str) -> str:
    shutil.copytree(src, dst)
    return dst


def write(d: str, name: str, data: bytes | str) -> str:
    """Overwrite file `name` of folder `d` (created if needed); return `d`."""
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data.encode() if isinstance(data, str) else data)
    return d


def remove(d: str, name: str) -> str:
    os.remove(os.path.join(d, name))
    return d


def edit_config(d: str, without: tuple[str, ...] = (), **changes: object) -> str:
    """Change (or with `without`, remove) fields of the folder's adapter_config.json."""
    with open(os.path.join(d, CONFIG)) as f:
        config = json.load(f)
    config.update(changes)
    for k in without:
        del config[k]
    return write(d, CONFIG, json.dumps(config))


def edit_tensors(d: str, fn: Callable[[dict[str, torch.Tensor]], None], name: str = WEIGHTS) -> str:
    """Load the folder's tensors, let `fn` change the dict, save them back."""
    found = load_file(os.path.join(d, name))
    fn(found)
    save_file(found, os.path.join(d, name))
    return d


def first(t: dict[str, torch.Tensor], suffix: str) -> str:
    """Name of the first tensor (sorted) ending in `suffix`."""
    return sorted(k for k in t if k.endswith(suffix))[0]


def set_tensor(suffix: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Callable:
    """An edit_tensors fn replacing the first tensor ending in `suffix` by `make(old)`."""

    def fn(t: dict[str, torch.Tensor]) -> None:
        k = first(t, suffix)
        t[k] = make(t[k]).contiguous()

    return fn


def poke(suffix: str, value: float) -> Callable:
    """An edit_tensors fn setting one element of the first tensor ending in `suffix`."""

    def change(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x.view(-1)[1] = value
        return x

    return set_tensor(suffix, change)


def read_header(path: str) -> tuple[dict, bytes]:
    """(header JSON, data bytes) of a safetensors file."""
    with open(path, "rb") as f:
        raw = f.read()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8 : 8 + n]), raw[8 + n :]


def raw_safetensors(header: bytes, data: bytes = b"", length: int | None = None) -> bytes:
    """A safetensors file from raw header bytes; `length` overrides the 8-byte header size."""
    return struct.pack("<Q", len(header) if length is None else length) + header + data


def edit_header(d: str, fn: Callable[[dict], None], name: str = WEIGHTS) -> str:
    """Let `fn` change the safetensors header of the folder's weights, keeping the data bytes."""
    head, data = read_header(os.path.join(d, name))
    fn(head)
    return write(d, name, raw_safetensors(json.dumps(head).encode(), data))


def header_entry(head: dict, suffix: str) -> dict:
    """The header entry of the first tensor (sorted) ending in `suffix`."""
    return head[sorted(k for k in head if k.endswith(suffix))[0]]


def symlink(target: str, link: str) -> str:
    """Make `link` a symlink to `target`; return `link`."""
    os.symlink(target, link)
    return link


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


# --- builders: Src -> path of a broken adapter (each takes a fresh copy of a good one) --------

Tensors = dict[str, torch.Tensor]
Builder = Callable[[Src], str]
A, B = "flora_A.weight", "flora_B.weight"


def flora(s: Src) -> str:
    """A fresh copy of the good FLoRA adapter at s.tmp."""
    return copy(s.flora, s.tmp)


def lora(s: Src) -> str:
    """A fresh copy of the good (PEFT) LoRA adapter at s.tmp."""
    return copy(s.lora, s.tmp)


def cfg(**changes: object) -> Builder:
    """A FLoRA copy with config fields changed."""
    return lambda s: edit_config(flora(s), **changes)


def cfg_without(*keys: str) -> Builder:
    """A FLoRA copy with config fields removed."""
    return lambda s: edit_config(flora(s), without=keys)


def config_text(text: str | bytes) -> Builder:
    """A FLoRA copy whose adapter_config.json is `text`."""
    return lambda s: write(flora(s), CONFIG, text)


def weights_bytes(data: bytes | Callable[[bytes], bytes]) -> Builder:
    """A FLoRA copy whose weights file holds `data` (or `data(good file bytes)`)."""

    def build(s: Src) -> str:
        d = flora(s)
        good = _read(os.path.join(d, WEIGHTS))
        return write(d, WEIGHTS, data(good) if callable(data) else data)

    return build


def tensors(fn: Callable[[Tensors], None], base: Builder = flora) -> Builder:
    """A copy (FLoRA unless `base` says otherwise) with its tensors changed by `fn`."""

    def build(s: Src) -> str:
        d = base(s)
        return edit_tensors(d, fn, WEIGHTS if base is flora else LORA_WEIGHTS)

    return build


def set_factor(suffix: str, make: Callable[[torch.Tensor], torch.Tensor]) -> Builder:
    """A FLoRA copy whose first tensor ending in `suffix` is replaced by `make(old)`."""
    return tensors(set_tensor(suffix, make))


def header(fn: Callable[[dict], None]) -> Builder:
    """A FLoRA copy whose safetensors header JSON is changed by `fn` (data bytes kept)."""
    return lambda s: edit_header(flora(s), fn)


def entry(suffix: str, **changes: object) -> Callable[[dict], None]:
    """A header edit: fields of the first tensor entry ending in `suffix` changed."""
    return lambda h: header_entry(h, suffix).update(changes)


def overlap(h: dict) -> None:
    """A header edit: the second tensor claims the first one's bytes."""
    a, b = (h[k] for k in sorted(k for k in h if k != "__metadata__")[:2])
    b["data_offsets"] = a["data_offsets"]


def drop(suffix: str) -> Callable[[Tensors], None]:
    """A tensors edit: the first tensor ending in `suffix` removed."""

    def fn(t: Tensors) -> None:
        del t[first(t, suffix)]

    return fn


def add(name: str, value: torch.Tensor) -> Callable[[Tensors], None]:
    """A tensors edit: one tensor added."""
    return lambda t: t.__setitem__(name, value)


def all_to(dtype: torch.dtype) -> Callable[[Tensors], None]:
    """A tensors edit: every tensor cast to `dtype`."""

    def fn(t: Tensors) -> None:
        for k in t:
            t[k] = t[k].to(dtype)

    return fn


def scaled(factor: float) -> Callable[[Tensors], None]:
    """A tensors edit: every tensor multiplied by `factor`."""

    def fn(t: Tensors) -> None:
        for k in t:
            t[k] = t[k] * factor

    return fn


def then(*fns: Callable[[Tensors], None]) -> Callable[[Tensors], None]:
    """Tensors edits applied in order."""

    def fn(t: Tensors) -> None:
        for f in fns:
            f(t)

    return fn


def deep_json(depth: int) -> str:
    """A config nesting `depth` JSON arrays (json.load recurses once per level)."""
    return '{"peft_type": "FLORA", "r": 2, "x": ' + "[" * depth + "]" * depth + "}"


def file_not_folder(s: Src) -> str:
    """A plain file where the adapter folder should be."""
    return os.path.join(write(s.tmp, "adapter", b"not a folder"), "adapter")


def lora_claiming(nbytes: int) -> Builder:
    """A LoRA copy whose weights file declares one `nbytes` tensor (a sparse file of that size:
    no disk used, but a loader that trusts the header would read it all)."""

    def build(s: Src) -> str:
        d = lora(s)
        name = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
        head = json.dumps({name: {"dtype": "F32", "shape": [nbytes // 4],
                                  "data_offsets": [0, nbytes]}}).encode()
        path = os.path.join(d, LORA_WEIGHTS)
        write(d, LORA_WEIGHTS, raw_safetensors(head))
        os.truncate(path, 8 + len(head) + nbytes)
        return d

    return build


def fifo_instead_of(name: str, of: Builder | None = None) -> Builder:
    """A copy (FLoRA unless `of`) where file `name` is a named pipe: opening it would block."""

    def build(s: Src) -> str:
        d = remove((of or flora)(s), name)
        os.mkfifo(os.path.join(d, name))
        return d

    return build


def folder_instead_of(name: str) -> Builder:
    """A FLoRA copy where file `name` is an (empty) folder."""

    def build(s: Src) -> str:
        d = remove(flora(s), name)
        os.mkdir(os.path.join(d, name))
        return d

    return build


def empty_folder(s: Src) -> str:
    os.makedirs(s.tmp)
    return s.tmp


# --- path builders for a server with allowed roots (s.tmp is inside a root) ------------------


def up_and_out(s: Src) -> str:
    """`<root>/../<...>/outside`: spelled from inside the root, resolving outside."""
    root = os.path.dirname(s.tmp)
    return os.path.join(root, os.path.relpath(s.outside, root))


def symlink_chain(s: Src) -> str:
    """s.tmp -> s.tmp-hop -> the outside adapter (both links inside the root)."""
    return symlink(symlink(s.outside, s.tmp + "-hop"), s.tmp)


def link_in(name: str, target: Callable[[Src], str]) -> Builder:
    """A FLoRA copy inside the root where entry `name` is a symlink to `target(s)`."""

    def build(s: Src) -> str:
        d = flora(s)
        if os.path.lexists(os.path.join(d, name)):
            os.remove(os.path.join(d, name))
        symlink(target(s), os.path.join(d, name))
        return d

    return build


def nested(depth: int, of: Builder = flora) -> Builder:
    """A copy (FLoRA unless `of`) with `depth` folders nested in it (a recursive walk of it
    exhausts Python's recursion limit)."""

    def build(s: Src) -> str:
        d = path = of(s)
        for _ in range(depth):
            path = os.path.join(path, "a")
            os.mkdir(path)
        return d

    return build


def many_files(n: int, of: Builder = flora) -> Builder:
    """A copy (FLoRA unless `of`) with `n` empty files in it."""

    def build(s: Src) -> str:
        d = of(s)
        for i in range(n):
            open(os.path.join(d, f"f{i}"), "w").close()
        return d

    return build


def symlink_loop(s: Src) -> str:
    """A FLoRA copy holding a link to itself (a walk that follows links never ends)."""
    d = flora(s)
    os.symlink(d, os.path.join(d, "loop"))
    return d


def ia3(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        **config: object) -> Builder:
    """A PEFT-format IA3 folder on every layer's down_proj (feed-forward: one value per input,
    1.1 each) next to the good LoRA's config, with `edit` applied to its tensors and `config`
    fields changed."""

    def build(s: Src) -> str:
        d = lora(s)
        names = [k for k in load_file(os.path.join(d, LORA_WEIGHTS))
                 if k.endswith("mlp.down_proj.lora_A.weight")]
        widths = {k: load_file(os.path.join(d, LORA_WEIGHTS))[k].shape[1] for k in names}
        vectors = {k.replace(".lora_A.weight", ".ia3_l"): torch.full((1, w), 1.1)
                   for k, w in widths.items()}
        save_file((edit or (lambda t: t))(vectors), os.path.join(d, LORA_WEIGHTS))
        settings = {"peft_type": "IA3", "target_modules": ["down_proj"],
                    "feedforward_modules": ["down_proj"], **config}
        return write(d, CONFIG, json.dumps(settings))

    return build


def first_vector(change: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable:
    """An `ia3` edit: replace the first vector by change(it), or drop it when that is None."""

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        first = sorted(t)[0]
        new = change(t[first])
        if new is None:
            del t[first]
        else:
            t[first] = new
        return t

    return edit


def dora(edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
         **config: object) -> Builder:
    """A PEFT-format DoRA folder: the good LoRA with `use_dora` set and a magnitude per module
    (0.5 per output: a valid one that changes answers), with `edit` applied to its tensors and
    `config` fields changed."""

    def build(s: Src) -> str:
        d = lora(s)
        t = load_file(os.path.join(d, LORA_WEIGHTS))
        for k in [k for k in t if k.endswith(".lora_B.weight")]:
            t[k.replace(".lora_B.weight", ".lora_magnitude_vector")] = torch.full(
                (t[k].shape[0],), 0.5
            )
        save_file((edit or (lambda x: x))(t), os.path.join(d, LORA_WEIGHTS))
        return edit_config(d, use_dora=True, **config)

    return build


def first_magnitude(change: Callable[[torch.Tensor], torch.Tensor | None]) -> Callable:
    """A `dora` edit: replace the first magnitude by change(it), or drop it when that is None."""

    def edit(t: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        k = first(t, ".lora_magnitude_vector")
        new = change(t[k])
        if new is None:
            del t[k]
        else:
            t[k] = new
        return t

    return edit
