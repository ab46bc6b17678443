"""Capturing a model as a graph for PT2E quantization (``torch.export``), whatever it returns.

``torch.export`` refuses outputs it cannot flatten: a Hugging Face model's key/value cache
object, some dataclasses. A model it refuses is captured through :class:`Logits`, which
returns only what the loss and metric read; its inputs are then taken positionally (export
handles keyword-only wrappers badly) and :class:`Keyed` gives the captured graph back the
workload's keyword inputs.

The batch dimension is always dynamic; with ``lengths`` (a token budget trims batches to
their longest sample) dim 1 of every input of two or more dimensions must be too, so a graph
captured on one sequence length runs on the others, and a model that fixes its length fails
to capture (the search space's probe then says why), not on a trial's third batch.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from advisor.workload import Inputs, call_args, logits_of


class Logits(nn.Module):
    """``model``, returning only its logits; inputs by position (``keys`` names them when
    the model takes keywords)."""

    def __init__(self, inner: nn.Module, keys: tuple[str, ...] = ()) -> None:
        super().__init__()
        self.inner, self.keys = inner, keys

    def forward(self, *values) -> torch.Tensor:
        if self.keys:
            return logits_of(self.inner(**dict(zip(self.keys, values, strict=True))))
        return logits_of(self.inner(*values))


class Keyed(nn.Module):
    """A graph captured with positional inputs, called with keyword inputs ``keys``."""

    def __init__(self, graph: nn.Module, keys: tuple[str, ...]) -> None:
        super().__init__()
        self.graph, self.keys = graph, keys

    def forward(self, **inputs) -> torch.Tensor:
        return self.graph(*(inputs[k] for k in self.keys))


def graph_of(model: nn.Module) -> nn.Module:
    """The captured graph inside a :class:`Keyed` (or the model itself)."""
    return model.graph if isinstance(model, Keyed) else model


def rewrap(graph: nn.Module, like: nn.Module) -> nn.Module:
    """``graph`` (prepared or converted from ``like``'s graph) called the way ``like`` is."""
    return Keyed(graph, like.keys) if isinstance(like, Keyed) else graph


def export(model: nn.Module, example: Inputs, lengths: bool = False) -> nn.Module:
    """The model's graph, called like the model; see the module docstring."""
    args, kwargs = call_args(example)
    auto = torch.export.Dim.AUTO

    def dims(value: torch.Tensor) -> dict:
        return {0: auto, 1: torch.export.Dim.DYNAMIC} if lengths and value.dim() >= 2 else {0: auto}

    try:
        shapes = {k: dims(v) for k, v in kwargs.items()} if kwargs else tuple(dims(a) for a in args)
        return torch.export.export(model, args, kwargs, dynamic_shapes=shapes).module()
    except Exception as exc:
        keys = tuple(kwargs)
        values = tuple(kwargs.values()) if kwargs else args
        try:
            graph = torch.export.export(Logits(model, keys), values,
                                        dynamic_shapes={"values": tuple(dims(v) for v in values)}).module()
        except Exception:
            raise exc from None
        return Keyed(graph, keys) if keys else graph


def allow_train_eval(graph: nn.Module) -> None:
    """Make ``.train()`` and ``.eval()`` switch a captured graph's dropout and batch norm,
    as torchao's ``allow_exported_model_train_eval`` does, with each dropout keeping its
    probability. torchao's pattern rewrite (0.18) sets every dropout it switches to p=0.5: a
    transformer fine-tuned through it trains under heavy dropout on every residual branch
    (the zoo's ViT fell from 0.933 after an fp32 fine-tune to 0.869 after the same steps
    through the captured graph, before any quantization)."""
    from torchao.quantization.pt2e import allow_exported_model_train_eval

    probabilities = [n.args[1] for n in _dropouts(graph)]
    # Attention dropout is an argument of scaled_dot_product_attention, captured with the
    # training-mode value (Hugging Face passes ``dropout_p`` only when training): no pattern
    # switches it, so it is set here, to 0 in eval (else inference is random, and slower).
    attention = {n: _attention_dropout(n) for n in _attentions(graph)}
    allow_exported_model_train_eval(graph)
    switch_train, switch_eval = graph.train, graph.eval

    def restore(training: bool) -> None:
        nodes = _dropouts(graph)
        if len(nodes) == len(probabilities):
            for node, p in zip(nodes, probabilities, strict=True):
                node.args = (node.args[0], p, *node.args[2:])
        for node, p in attention.items():
            _set_attention_dropout(node, p if training else 0.0)
        graph.recompile()

    def train(self, mode: bool = True):
        switch_train(mode)
        restore(mode)
        return self

    def eval(self):
        switch_eval()
        restore(False)
        return self

    graph.train = types.MethodType(train, graph)
    graph.eval = types.MethodType(eval, graph)


_SDPA_DROPOUT = 4  # scaled_dot_product_attention(query, key, value, attn_mask, dropout_p, ...)


def _attentions(graph: nn.Module) -> list:
    return [n for n in graph.graph.nodes
            if n.op == "call_function" and n.target == torch.ops.aten.scaled_dot_product_attention.default]


def _attention_dropout(node) -> float:
    if len(node.args) > _SDPA_DROPOUT:
        return node.args[_SDPA_DROPOUT]
    return node.kwargs.get("dropout_p", 0.0)


def _set_attention_dropout(node, p: float) -> None:
    if len(node.args) > _SDPA_DROPOUT:
        node.args = (*node.args[:_SDPA_DROPOUT], p, *node.args[_SDPA_DROPOUT + 1:])
    elif p or "dropout_p" in node.kwargs:
        node.kwargs = {**node.kwargs, "dropout_p": p}


def _dropouts(graph: nn.Module) -> list:
    return [n for n in graph.graph.nodes if n.op == "call_function" and n.target == torch.ops.aten.dropout.default]
