"""A compact way to write a network: "conv 3x3x32 -> bn -> relu -> maxpool 2 -> ... -> gap -> dense 64".

model/ takes a network as {"blocks": [dicts], "head": {...}}. Config files may give that directly, or
a string of steps separated by "->" (or "→"), or a list mixing step strings and block dicts. Steps:

    conv KxKxC [stride S] [pad N|same|valid] [dilation D]    (padding defaults to "same")
    bn | relu | leaky_relu | gelu | silu | tanh | sigmoid
    maxpool K [stride S] [pad N] | avgpool K [stride S] [pad N]
    dropout P                                                  (before the head: 2-D dropout)
    gap | flatten                                              (starts the head)
    dense N | dropout P | <activation>                         (in the head; logits are added last)
"""

from __future__ import annotations

import re
from typing import Any

from model.layers import ACTIVATIONS, POOLS
from training.config import ConfigError

_CONV = re.compile(r"^(\d+)x(\d+)x(\d+)$")


def parse_network(network: Any) -> dict[str, Any]:
    """str | list | {"blocks", "head"} -> the dict model.registry.build_model takes as `config`."""
    if isinstance(network, dict):
        unknown = set(network) - {"blocks", "head"}
        if unknown:
            raise ConfigError(f"network: unknown keys {sorted(unknown)}; use 'blocks' and 'head'")
        parsed = parse_network(network.get("blocks", []))
        parsed["head"] = {**parsed["head"], **network.get("head", {})}
        return parsed
    if isinstance(network, str):
        steps: list[Any] = [s for s in re.split(r"->|→|\n", network) if s.strip()]
    elif isinstance(network, list):
        steps = network
    else:
        raise ConfigError(
            f"network must be a string, a list of steps or a table, got {type(network).__name__}"
        )
    blocks: list[dict[str, Any]] = []
    head: dict[str, Any] = {}
    for i, step in enumerate(steps):
        if isinstance(step, dict):
            if head:
                raise ConfigError(f"network step {i}: a block cannot follow the head ({step})")
            blocks.append(step)
        elif isinstance(step, str):
            _parse_step(step.strip(), i, blocks, head)
        else:
            raise ConfigError(f"network step {i}: expected a string or a table, got {step!r}")
    if not blocks:
        raise ConfigError("network has no blocks; start with e.g. 'conv 3x3x32'")
    return {"blocks": blocks, "head": head or {"pool": "gap"}}


def _parse_step(step: str, i: int, blocks: list[dict[str, Any]], head: dict[str, Any]) -> None:
    words = step.lower().split()
    if not words:
        raise ConfigError(f"network step {i} is empty")
    kind, args = words[0], words[1:]
    where = f"network step {i} ({step!r})"
    if kind in ("gap", "flatten"):
        if head or args:
            raise ConfigError(f"{where}: the head starts once, with a bare 'gap' or 'flatten'")
        head["pool"] = kind
        return
    if head:  # inside the head
        if kind == "dense" and len(args) == 1 and args[0].isdigit():
            head.setdefault("dense", []).append(int(args[0]))
        elif kind == "dropout" and len(args) == 1:
            head["dropout"] = _number(args[0], where)
        elif kind in ACTIVATIONS and not args:
            head["activation"] = kind
        else:
            raise ConfigError(f"{where}: after gap/flatten use 'dense N', 'dropout P' or an activation")
        return
    if kind == "conv":
        m = _CONV.match(args[0]) if args else None
        if not m or m.group(1) != m.group(2):
            raise ConfigError(f"{where}: write a square kernel and the output channels, e.g. 'conv 3x3x32'")
        block: dict[str, Any] = {"type": "conv", "kernel": int(m.group(1)), "out": int(m.group(3))}
        block["padding"] = "same"
        block.update(_options(args[1:], where, {"stride", "pad", "dilation"}))
    elif kind in POOLS:
        if not args or not args[0].isdigit():
            raise ConfigError(f"{where}: give the pooling size, e.g. '{kind} 2'")
        block = {"type": kind, "kernel": int(args[0]), **_options(args[1:], where, {"stride", "pad"})}
    elif kind == "dropout":
        block = {"type": "dropout", "p": _number(args[0], where) if args else 0.25}
    elif kind == "bn" or kind in ACTIVATIONS:
        if args:
            raise ConfigError(f"{where}: '{kind}' takes no arguments")
        block = {"type": kind}
    else:
        raise ConfigError(
            f"{where}: unknown step; use conv, bn, an activation ({', '.join(ACTIVATIONS)}), "
            "maxpool, avgpool, dropout, then gap or flatten and dense"
        )
    blocks.append(block)


def _options(words: list[str], where: str, allowed: set[str]) -> dict[str, Any]:
    if len(words) % 2:
        raise ConfigError(f"{where}: options come in pairs like 'stride 2'")
    out: dict[str, Any] = {}
    for key, value in zip(words[::2], words[1::2], strict=True):
        if key not in allowed:
            raise ConfigError(f"{where}: unknown option {key!r}; allowed: {sorted(allowed)}")
        name = "padding" if key == "pad" else key
        out[name] = value if value in ("same", "valid") else int(_number(value, where))
    return out


def _number(text: str, where: str) -> float:
    try:
        return float(text)
    except ValueError:
        raise ConfigError(f"{where}: {text!r} is not a number") from None


def format_network(config: dict[str, Any]) -> str:
    """The compact form of a {"blocks", "head"} network (what `describe` prints)."""
    steps = []
    for b in config.get("blocks", []):
        kind = b["type"]
        if kind == "conv":
            k = b.get("kernel", 3)
            s = f"conv {k}x{k}x{b['out']}"
            for key, label in (("stride", "stride"), ("dilation", "dilation")):
                if b.get(key, 1) != 1:
                    s += f" {label} {b[key]}"
            if b.get("padding", 0) != "same":
                s += f" pad {b.get('padding', 0)}"
            steps.append(s)
        elif kind in POOLS:
            s = f"{kind} {b.get('kernel', 2)}"
            if b.get("stride", b.get("kernel", 2)) != b.get("kernel", 2):
                s += f" stride {b['stride']}"
            steps.append(s + (f" pad {b['padding']}" if b.get("padding") else ""))
        elif kind == "dropout":
            steps.append(f"dropout {b.get('p', 0.25)}")
        else:
            steps.append(kind)
    head = config.get("head", {})
    steps.append(head.get("pool", "gap"))
    steps += [f"dense {n}" for n in head.get("dense", [])]
    if head.get("activation", "relu") != "relu":
        steps.append(head["activation"])
    if head.get("dropout"):
        steps.append(f"dropout {head['dropout']}")
    return " -> ".join(steps)
