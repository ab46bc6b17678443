"""Attention heads, found generically and removed whole: the attention half of structured pruning.

A head is ``head_dim`` rows of the query, key and value projections and as many input
columns of the output projection; the forward reshapes by the head count or the head size.
Pruning channels without knowing that breaks the reshapes (``shape '[64, 32, -1, 16]' is
invalid``). Here whole heads go, the head size stays (rotary embeddings keep working), and
the attributes the forward reads are set to the new counts.

An attention module is recognised by its projections, whatever its class:

- separate query/key/value ``nn.Linear`` children (``query``/``key``/``value``,
  ``q_proj``/``k_proj``/``v_proj``, ``q``/``k``/``v``, ``q_lin``/``k_lin``/``v_lin``), or a
  fused one of 3 x heads x head_dim outputs (``c_attn``, ``qkv``, ``query_key_value``);
- the output projection: a child ``o_proj``/``out_proj``/``o``/``c_proj``/``out_lin``/``dense``,
  or its parent's ``output.dense`` (BERT, ViT), whose inputs are the heads;
- the head counts: the module's ``num_heads``-like attribute or its ``config``'s
  ``num_attention_heads`` and ``num_key_value_heads``.

With grouped-query attention a key/value head and the query heads that read it go together,
so every kept query head still has its key/value head. Modules whose heads are tied across
layers (T5's shared relative position bias) or whose sizes do not add up are listed as
skipped, with the reason; their projections are then left whole. ``nn.MultiheadAttention``
is not handled here: its fused kernel needs the heads to fill the model width.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

Q_NAMES = ("q_proj", "query", "q", "q_lin")
K_NAMES = ("k_proj", "key", "k", "k_lin")
V_NAMES = ("v_proj", "value", "v", "v_lin")
FUSED_NAMES = ("c_attn", "qkv", "query_key_value")
OUT_NAMES = ("o_proj", "out_proj", "o", "c_proj", "out_lin", "dense")
HEAD_ATTRS = ("num_attention_heads", "num_heads", "n_heads", "n_head")
KV_ATTRS = ("num_key_value_heads", "num_kv_heads", "n_kv_heads")
SIZE_ATTRS = ("head_dim", "attention_head_size", "key_value_proj_dim")
WIDTH_ATTRS = ("all_head_size", "inner_dim", "split_size")  # heads x head_dim, as the forward reads it


@dataclass
class Attention:
    name: str
    module: nn.Module
    out: nn.Linear | None = None
    q: nn.Linear | None = None
    k: nn.Linear | None = None
    v: nn.Linear | None = None
    qkv: nn.Linear | None = None  # fused: [q; k; v] rows
    heads: int = 0
    kv_heads: int = 0
    head_dim: int = 0
    skipped: str = ""  # why its heads are left whole ("" when they can be pruned)
    projections: list[nn.Module] = field(default_factory=list)


def _child(module: nn.Module, names: tuple[str, ...]) -> nn.Linear | None:
    for name in names:
        child = getattr(module, name, None)
        if isinstance(child, nn.Linear):
            return child
    return None


def _count(module: nn.Module, names: tuple[str, ...]) -> int | None:
    for owner in (module, getattr(module, "config", None)):
        for name in names:
            value = getattr(owner, name, None) if owner is not None else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                return value
    return None


def find(model: nn.Module) -> list[Attention]:
    """The model's attention modules, each with its projections and head counts."""
    parents = {id(child): parent for parent in model.modules() for child in parent.children()}
    found = []
    for name, module in model.named_modules():
        q, k, v = _child(module, Q_NAMES), _child(module, K_NAMES), _child(module, V_NAMES)
        fused = None if (q and k and v) else _child(module, FUSED_NAMES)
        if not (q and k and v) and fused is None:
            continue
        att = Attention(name, module, q=q, k=k, v=v, qkv=fused)
        att.projections = [p for p in (q, k, v, fused) if p is not None]
        parent = parents.get(id(module))
        out = _child(module, OUT_NAMES)
        if out is None and parent is not None and isinstance(getattr(parent, "output", None), nn.Module):
            out = _child(parent.output, ("dense",))
        att.out = out
        if out is not None:
            att.projections.append(out)
        att.skipped = _measure(att)
        found.append(att)
    return found


def _measure(att: Attention) -> str:
    """Fill in the head counts and size; the reason the heads cannot be pruned, or ""."""
    module = att.module
    if getattr(module, "relative_attention_bias", None) is not None or \
            getattr(module, "has_relative_attention_bias", None) is not None:
        return "its heads share a relative position bias across layers"
    size = _count(module, SIZE_ATTRS)  # the head size, where the module keeps it
    if att.qkv is not None:
        width = att.qkv.out_features
        heads = width // (3 * size) if size else _count(module, HEAD_ATTRS)
        if heads is None:
            return "no head count found (num_heads, num_attention_heads or config.num_attention_heads)"
        if width % (3 * heads):
            return f"a fused projection of {width} outputs does not split into 3 x {heads} heads"
        kv, head_dim = heads, width // (3 * heads)
    else:
        if size:
            heads, kv, head_dim = att.q.out_features // size, att.k.out_features // size, size
        else:
            heads = _count(module, HEAD_ATTRS)
            if heads is None:
                return "no head count found (num_heads, num_attention_heads or config.num_attention_heads)"
            kv = _count(module, KV_ATTRS) or heads
            head_dim = att.q.out_features // heads
        if not heads or not kv or att.q.out_features != heads * head_dim or heads % kv or \
                att.k.out_features != kv * head_dim or att.v.out_features != kv * head_dim:
            return (f"projection sizes (q {att.q.out_features}, k {att.k.out_features}, "
                    f"v {att.v.out_features}) do not split into heads of one size")
    if att.out is None or att.out.in_features != heads * head_dim:
        return "no output projection reading the heads was found"
    att.heads, att.kv_heads, att.head_dim = heads, kv, head_dim
    return ""


def _units(att: Attention) -> tuple[int, int]:
    """(how many units can go, query heads per unit): a unit is a key/value head and the
    query heads reading it, or one query head when all share one key/value head."""
    if att.kv_heads > 1:
        return att.kv_heads, att.heads // att.kv_heads
    return att.heads, 1


def prune(att: Attention, ratio: float) -> int:
    """Remove the lowest-L1 ``ratio`` of ``att``'s heads (at least one is kept); returns
    how many query heads went."""
    units, per = _units(att)
    drop = min(units - 1, int(ratio * units + 0.5))
    if att.skipped or drop <= 0:
        return 0
    hd = att.head_dim
    score = torch.zeros(units)
    for head in range(att.heads):
        unit = head // per if att.kv_heads > 1 else head
        score[unit] += _l1(att.out.weight[:, head * hd:(head + 1) * hd])
        for proj, offset in _q_parts(att):
            score[unit] += _l1(proj.weight[offset + head * hd:offset + (head + 1) * hd])
    for kv_head in range(att.kv_heads if 1 < att.kv_heads < att.heads else 0):
        for proj in (att.k, att.v):
            score[kv_head] += _l1(proj.weight[kv_head * hd:(kv_head + 1) * hd])
    kept_units = sorted(torch.argsort(score, descending=True)[:units - drop].tolist())
    if att.kv_heads > 1:
        q_heads = [u * per + i for u in kept_units for i in range(per)]
        kv_heads = kept_units
    else:
        q_heads, kv_heads = kept_units, list(range(att.kv_heads))
    if att.kv_heads == att.heads:
        kv_heads = q_heads
    q_rows = _channels(q_heads, hd)
    if att.qkv is not None:
        width = att.heads * hd
        _keep(att.qkv, torch.cat([q_rows, q_rows + width, q_rows + 2 * width]), dim=0)
    else:
        kv_rows = _channels(kv_heads, hd)
        _keep(att.q, q_rows, dim=0)
        _keep(att.k, kv_rows, dim=0)
        _keep(att.v, kv_rows, dim=0)
    _keep(att.out, q_rows, dim=1)
    removed = att.heads - len(q_heads)
    _set_counts(att, len(q_heads), len(kv_heads))
    return removed


def _q_parts(att: Attention) -> list[tuple[nn.Linear, int]]:
    """Projections holding query-head rows, with the row offset of head 0 (fused: q, k and
    v of every head, as the fused layout has one key/value head per query head)."""
    if att.qkv is not None:
        width = att.heads * att.head_dim
        return [(att.qkv, 0), (att.qkv, width), (att.qkv, 2 * width)]
    if att.kv_heads == att.heads:
        return [(att.q, 0), (att.k, 0), (att.v, 0)]
    return [(att.q, 0)]


def _l1(weight: torch.Tensor) -> float:
    return float(weight.detach().abs().sum())


def _channels(heads: list[int], head_dim: int) -> torch.Tensor:
    return torch.cat([torch.arange(h * head_dim, (h + 1) * head_dim) for h in heads])


def _keep(linear: nn.Linear, index: torch.Tensor, dim: int) -> None:
    """Keep only ``index`` of the layer's outputs (dim 0) or inputs (dim 1), in place."""
    index = index.to(linear.weight.device)
    weight = linear.weight.detach().index_select(dim, index).clone()
    linear.weight = nn.Parameter(weight, requires_grad=linear.weight.requires_grad)
    if dim == 0:
        if linear.bias is not None:
            linear.bias = nn.Parameter(linear.bias.detach().index_select(0, index).clone(),
                                       requires_grad=linear.bias.requires_grad)
        linear.out_features = len(index)
    else:
        linear.in_features = len(index)


def _set_counts(att: Attention, heads: int, kv_heads: int) -> None:
    """Set the attributes the forward reads to the pruned counts (the shared config is left
    as it was: other modules may read it at build time only)."""
    module = att.module
    for name in HEAD_ATTRS:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, heads)
    for name in KV_ATTRS:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, kv_heads)
    if isinstance(getattr(module, "num_key_value_groups", None), int):
        module.num_key_value_groups = heads // kv_heads
    for name in WIDTH_ATTRS:
        if isinstance(getattr(module, name, None), int):
            setattr(module, name, heads * att.head_dim)
    att.heads, att.kv_heads = heads, kv_heads
