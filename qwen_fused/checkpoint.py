"""Whole-transformer checkpoints: standard <-> merged layout, streamed; loading one into a fused model.

A merged checkpoint has `...attn.to_qkv.weight = cat([to_q, to_k, to_v].weight)` (and bias, and
`add_qkv_proj` for the text stream) instead of the q/k/v keys; every other key is unchanged. Conversion reads
one tensor group at a time through `safe_open` (memory-mapped) and writes safetensors by hand, tensor by
tensor, so memory stays at one q/k/v group however large the file or shard. Sharded diffusers folders
(`*.safetensors.index.json`) are converted shard by shard, keeping the shard files and writing a new index.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import struct
from dataclasses import dataclass, field

import torch

from .atomic import atomic_output
from .names import STANDARD, STREAMS

__all__ = ["convert_checkpoint", "load_checkpoint", "from_pretrained", "plan_conversion", "checkpoint_files"]

_KEY = re.compile(r"^(?P<pre>(?:.*\.)?transformer_blocks\.\d+\.attn\.)(?P<leaf>" +
                  "|".join(list(STREAMS) + list(STANDARD)) + r")\.(?P<param>.+)$")
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2}
_NAMES = {v: k for k, v in _DTYPES.items()}


@dataclass
class Plan:
    """Output key -> how to make it: ("copy", key) | ("cat", [q, k, v keys]) | ("split", key, part index)."""

    recipes: dict = field(default_factory=dict)
    groups: int = 0  # q/k/v groups merged or split
    direction: str = ""


def plan_conversion(keys, direction, already_ok=False) -> Plan:
    """What every output tensor is made of, for checkpoint `keys` and `direction` to_merged | to_standard.

    A checkpoint already in the target layout raises, or gets a plan of plain copies when `already_ok`.
    """
    if direction not in ("to_merged", "to_standard"):
        raise ValueError(f"direction must be 'to_merged' or 'to_standard', got {direction!r}")
    keys = list(keys)
    matched = {k: _KEY.match(k) for k in keys}
    merged = sorted(k for k, m in matched.items() if m and m["leaf"] in STREAMS)
    standard = sorted(k for k, m in matched.items() if m and m["leaf"] in STANDARD)
    odd = sorted(k for k, m in matched.items() if m and m["param"] not in ("weight", "bias"))
    if odd:
        raise ValueError(f"cannot convert q/k/v tensors other than weight/bias (quantised checkpoint?): {odd[:6]}")
    if merged and standard:
        raise ValueError(f"checkpoint mixes merged ({merged[0]}, ...) and standard ({standard[0]}, ...) q/k/v keys")
    if not merged and not standard:
        raise ValueError("no q/k/v projection keys (transformer_blocks.N.attn.to_q / to_qkv ...) in this checkpoint; "
                         "not a Qwen-Image transformer checkpoint")
    plan = Plan(direction=direction)
    if direction == "to_merged" and merged or direction == "to_standard" and standard:
        if already_ok:
            return Plan(recipes={k: ("copy", k) for k in keys}, direction=direction)
        raise ValueError(f"checkpoint is already in {'merged' if merged else 'standard'} layout")
    if direction == "to_merged":
        groups, missing = {}, []
        for k in standard:
            m = matched[k]
            mname, i = STANDARD[m["leaf"]]
            groups.setdefault(f"{m['pre']}{mname}.{m['param']}", [None] * 3)[i] = k
        for out, parts in groups.items():
            if None in parts:
                stds = STREAMS[out.rsplit(".", 2)[-2]]
                missing += [out.replace(out.rsplit(".", 2)[-2], stds[i]) for i, p in enumerate(parts) if p is None]
        if missing:
            raise ValueError(f"q/k/v keys missing, cannot merge: {', '.join(missing)}")
    for k in keys:
        m = matched[k]
        if m is None:
            plan.recipes[k] = ("copy", k)
        elif direction == "to_merged":
            mname, i = STANDARD[m["leaf"]]
            if i == 0:
                out = f"{m['pre']}{mname}.{m['param']}"
                plan.recipes[out] = ("cat", groups[out])
                plan.groups += 1
        else:
            for i, std in enumerate(STREAMS[m["leaf"]]):
                plan.recipes[f"{m['pre']}{std}.{m['param']}"] = ("split", k, i)
            plan.groups += 1
    return plan


class _Reader:
    """Lazily opened safetensors files of one checkpoint; `where[key]` names the file holding it."""

    def __init__(self, where):
        from safetensors import safe_open

        self.where, self._open, self._handles = where, safe_open, {}

    def handle(self, key):
        path = self.where[key]
        if path not in self._handles:
            try:
                self._handles[path] = self._open(path, framework="pt").__enter__()
            except Exception as e:
                raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
        return self._handles[path]

    def tensor(self, key, rows=None):
        """The tensor `key`, or only its `rows` (a slice; read without loading the rest)."""
        return self.handle(key).get_tensor(key) if rows is None else self.handle(key).get_slice(key)[rows]

    def info(self, key):
        sl = self.handle(key).get_slice(key)
        return _DTYPES[sl.get_dtype()], list(sl.get_shape())


def _recipe_info(reader, recipe, name):
    kind = recipe[0]
    if kind == "copy":
        return reader.info(recipe[1])
    if kind == "cat":
        infos = [reader.info(k) for k in recipe[1]]
        if len({(d, tuple(s[1:])) for d, s in infos}) != 1:
            raise ValueError(f"{name}: q/k/v parts disagree in dtype or shape: "
                             + ", ".join(f"{k} {d} {s}" for k, (d, s) in zip(recipe[1], infos)))
        return infos[0][0], [sum(s[0] for _, s in infos)] + infos[0][1][1:]
    dtype, shape = reader.info(recipe[1])
    if shape[0] % 3:
        raise ValueError(f"{recipe[1]}: {shape[0]} rows are not three equal q/k/v parts")
    return dtype, [shape[0] // 3] + shape[1:]


def _make(reader, recipe):
    kind = recipe[0]
    if kind == "copy":
        return reader.tensor(recipe[1])
    if kind == "cat":
        return torch.cat([reader.tensor(k) for k in recipe[1]])
    n = reader.info(recipe[1])[1][0] // 3
    return reader.tensor(recipe[1], slice(recipe[2] * n, (recipe[2] + 1) * n))


def _write_streaming(path, names, reader, recipes, metadata=None):
    """Write a safetensors file tensor by tensor (header first from shapes, then the bytes)."""
    header, offset = {}, 0
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    for name in names:
        dtype, shape = _recipe_info(reader, recipes[name], name)
        size = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": _NAMES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name in names:
            t = _make(reader, recipes[name]).contiguous()
            if list(t.shape) != header[name]["shape"]:
                raise ValueError(f"{name}: produced shape {list(t.shape)}, expected {header[name]['shape']}")
            if t.numel():
                f.write(t.view(-1).view(torch.uint8).numpy())  # via the buffer protocol: no extra copy
    return offset


def checkpoint_files(path):
    """(kind, files, index) for a checkpoint path: kind 'file' or 'sharded'; index = parsed index.json or None."""
    path = os.fspath(path)
    if os.path.isdir(path):
        indexes = sorted(f for f in os.listdir(path) if f.endswith(".safetensors.index.json"))
        if len(indexes) > 1:
            raise ValueError(f"{path} holds several index files: {indexes}")
        if indexes:
            path = os.path.join(path, indexes[0])
        else:
            files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
            if len(files) != 1:
                raise ValueError(f"{path}: expected one .safetensors file or an index.json, found {files}")
            return "file", [os.path.join(path, files[0])], None
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.endswith(".index.json"):
        with open(path) as f:
            index = json.load(f)
        if "weight_map" not in index:
            raise ValueError(f"{path} has no weight_map; not a safetensors index")
        folder = os.path.dirname(path)
        files = sorted({os.path.join(folder, v) for v in index["weight_map"].values()})
        missing = [f for f in files if not os.path.exists(f)]
        if missing:
            raise FileNotFoundError(f"shards named in {path} are missing: {missing}")
        return "sharded", files, (path, index)
    return "file", [path], None


def _keys_of(files):
    from safetensors import safe_open

    where, metadata = {}, {}
    for path in files:
        try:
            with safe_open(path, framework="pt") as f:
                for k in f.keys():
                    where[k] = path
                metadata[path] = f.metadata() or {}
        except Exception as e:
            raise ValueError(f"{path} is not a readable safetensors file: {e}") from e
    return where, metadata


def convert_checkpoint(input_path, output_path, direction, overwrite=False) -> dict:
    """Convert a transformer checkpoint between standard and merged layout; returns a summary dict.

    A single file -> a single file; a folder (sharded with an index.json, or one file) or an index.json -> a
    folder with the same file names, a new index and the other files (config.json, ...) copied. Atomic:
    written under a temporary name beside the output, then renamed. Refuses an existing output unless
    `overwrite`.
    """
    kind, files, index = checkpoint_files(input_path)
    folder = index is not None or os.path.isdir(input_path)
    with atomic_output(output_path, overwrite, folder=folder) as tmp:
        where, file_meta = _keys_of(files)
        plan = plan_conversion(where, direction)
        reader = _Reader(where)
        layout = direction.removeprefix("to_")
        if not folder:
            _write_streaming(tmp, list(plan.recipes), reader, plan.recipes,
                             dict(file_meta[files[0]], qwen_fused_layout=layout))
        else:
            anchor = {out: (r[1][0] if r[0] == "cat" else r[1]) for out, r in plan.recipes.items()}
            weight_map, total = {}, 0
            for path in files:  # each output tensor goes to the shard of its (first) source tensor
                names = [o for o in plan.recipes if where[anchor[o]] == path]
                shard = os.path.basename(path)
                total += _write_streaming(os.path.join(tmp, shard), names, reader, plan.recipes,
                                          dict(file_meta[path], qwen_fused_layout=layout))
                weight_map.update({n: shard for n in names})
            copied = {os.path.basename(p) for p in files}
            if index is not None:
                index_path, index_data = index
                new_index = dict(index_data, weight_map=dict(sorted(weight_map.items())))
                new_index["metadata"] = dict(index_data.get("metadata", {}), total_size=total)
                with open(os.path.join(tmp, os.path.basename(index_path)), "w") as f:
                    json.dump(new_index, f, indent=2)
                copied.add(os.path.basename(index_path))
            src_folder = os.path.dirname(files[0])
            for other in os.listdir(src_folder):  # config.json and friends travel along
                src = os.path.join(src_folder, other)
                if other not in copied and os.path.isfile(src) and not other.endswith(".safetensors"):
                    shutil.copy2(src, os.path.join(tmp, other))
    return dict(kind=kind, direction=direction, tensors_in=len(where), tensors_out=len(plan.recipes),
                groups=plan.groups, files=len(files), output=os.fspath(output_path))


# ----------------------------------------------------------------------------------------------------------
# loading

def load_checkpoint(transformer, path, strict=True):
    """Load a standard or merged checkpoint into `transformer` (fused or not), converting q/k/v on the fly.

    Reads one tensor group at a time and assigns it (works on a model built with empty/meta weights).
    With strict, every model key must be provided and every checkpoint key used. Returns the transformer.
    """
    from .fuse import is_fused

    _, files, _ = checkpoint_files(path)
    where, _ = _keys_of(files)
    want = "to_merged" if is_fused(transformer) else "to_standard"
    plan = plan_conversion(where, want, already_ok=True)
    model_keys = set(transformer.state_dict())
    missing = sorted(model_keys - set(plan.recipes))
    unexpected = sorted(set(plan.recipes) - model_keys)
    if strict and (missing or unexpected):
        raise ValueError(f"checkpoint does not match this transformer: missing {missing[:8]}"
                         f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
                         f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})")
    reader = _Reader(where)
    current = transformer.state_dict()
    for name, recipe in plan.recipes.items():
        if name not in model_keys:
            continue
        dtype, shape = _recipe_info(reader, recipe, name)
        if tuple(shape) != tuple(current[name].shape):
            raise ValueError(f"{name}: checkpoint shape {tuple(shape)} != model shape {tuple(current[name].shape)}")
    for name, recipe in plan.recipes.items():
        if name in model_keys:
            _assign(transformer, name, _make(reader, recipe))
    return transformer


def _assign(model, name, tensor):
    """Copy into the existing tensor, or replace it when it lives on the meta device (empty weights).

    The meta case is accelerate's `set_module_tensor_to_device`, told to keep the checkpoint's dtype (its default
    casts to the meta tensor's dtype: a bf16 checkpoint would load as fp32). A materialised tensor is copied into
    in place instead: accelerate would replace the Parameter object (optimizers and tied weights would keep the
    old one), where loading a checkpoint into a live model must behave like `load_state_dict`.
    """
    from accelerate.utils import set_module_tensor_to_device

    owner, _, attr = name.rpartition(".")
    old = getattr(model.get_submodule(owner), attr)
    if old.device.type != "meta":
        with torch.no_grad():
            old.copy_(tensor)
    else:
        set_module_tensor_to_device(model, name, str(tensor.device), value=tensor, dtype=tensor.dtype)


def from_pretrained(path, torch_dtype=None, fused=True):
    """A QwenImageTransformer2DModel from a diffusers folder (config.json + standard or merged weights).

    Built with empty weights, fused first when `fused`, then filled by `load_checkpoint`, so a merged
    checkpoint never needs the standard layout in memory.
    """
    from accelerate import init_empty_weights
    from diffusers import QwenImageTransformer2DModel

    from .fuse import fuse_qkv

    path = os.fspath(path)
    folder = path if os.path.isdir(path) else os.path.dirname(path)
    config_path = os.path.join(folder, "config.json")
    if not os.path.exists(config_path):
        raise FileNotFoundError(f"no config.json beside the checkpoint in {folder}")
    config = QwenImageTransformer2DModel.load_config(folder)
    with init_empty_weights():
        model = QwenImageTransformer2DModel.from_config(config)
    if fused:
        fuse_qkv(model)
    load_checkpoint(model, path)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model.eval()
