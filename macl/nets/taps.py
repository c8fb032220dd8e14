"""MACL's taps in any encoder–decoder: named modules read with forward hooks, the user's module unchanged.

A tap is a module path of the user's network (``net.get_submodule(path)``) whose forward output is the feature
MACL needs:

- ``bottleneck``: the encoder's deepest feature (B, C_b, *S/stride) — L_g's auxiliary image head, the auxiliary
  pixel head (L_d) and, unless ``er`` is given, L_ER;
- ``decoder``: the decoder level MACL contrasts (B, C_d, *S·r/stride) — the dominant pixel map of L_d and the
  dominant image head; r (per axis) is how many times finer it is than the bottleneck (4 for two ×2 levels);
- ``er`` (optional): L_ER's feature, a module on the encoder side (it must run before the bottleneck returns).

`TapSet.run(x, stop_at=role)` runs the network and stops it with an internal exception as soon as the module of
``role`` has returned, so an encoder-only pass really runs only the encoder (MACL's auxiliary branch) and the
dominant pass runs the encoder and the decoder levels up to the tap, never the rest of the network.
`TapSet.probe(shape, stop_at)` does the same on a copy of the network whose tensors live on the ``meta``
device: output shapes and the modules that ran, without computing anything (the geometry checks and the list
of pre-trained tensors come from it).
"""
from __future__ import annotations

import copy
import difflib
from dataclasses import dataclass
from typing import Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

ROLES = ("bottleneck", "decoder", "er")


class TapError(ValueError):
    """A tap that names no module, does not run, or a network that is not an encoder–decoder (one line)."""


@dataclass(frozen=True)
class Taps:
    """Module paths of the taps (see the module docstring). decoder None: an encoder-only method (PCL, SimCLR)."""

    bottleneck: str
    decoder: Optional[str] = None
    er: Optional[str] = None

    @classmethod
    def from_any(cls, obj: Union["Taps", Mapping]) -> "Taps":
        """A `Taps`, or a mapping {"bottleneck": path, "decoder": path or [path], "er": path}.

        Raises TapError for unknown keys, a missing bottleneck, or a decoder list of more than one level.
        """
        if isinstance(obj, Taps):
            return obj
        if not isinstance(obj, Mapping):
            raise TapError(f"taps must be a mapping like {{'bottleneck': 'down_4', 'decoder': 'upcat_3'}}, got {obj!r}")
        bad = sorted(set(obj) - set(ROLES))
        if bad:
            raise TapError(f"unknown tap name(s) {bad}; known: {list(ROLES)}")
        if not obj.get("bottleneck"):
            raise TapError(f"taps need a 'bottleneck' module path, got {dict(obj)!r}")
        dec = obj.get("decoder")
        if isinstance(dec, (list, tuple)):
            if len(dec) != 1:
                raise TapError(f"MACL contrasts one decoder level (the one aligned with the auxiliary bottleneck); "
                               f"taps['decoder'] lists {len(dec)}: {list(dec)!r}")
            dec = dec[0]
        return cls(str(obj["bottleneck"]), None if dec is None else str(dec),
                   None if obj.get("er") is None else str(obj["er"]))

    def roles(self) -> Dict[str, str]:
        """{role: module path} of the taps set (er defaults to the bottleneck's module)."""
        out = {"bottleneck": self.bottleneck, "er": self.er or self.bottleneck}
        if self.decoder is not None:
            out["decoder"] = self.decoder
        return out

    def to_dict(self) -> dict:
        return {"bottleneck": self.bottleneck, "decoder": self.decoder, "er": self.er}


def resolve_module(net: nn.Module, path: str, role: str) -> nn.Module:
    """net.get_submodule(path); TapError naming the tap, the network and the nearest module paths otherwise."""
    try:
        return net.get_submodule(path)
    except AttributeError:
        names = [n for n, _ in net.named_modules() if n]
        near = difflib.get_close_matches(path, names, n=3, cutoff=0.5)
        hint = f"; nearest: {near}" if near else f"; top-level modules: {[n for n, _ in net.named_children()]}"
        raise TapError(f"tap {role!r}: {type(net).__name__} has no module {path!r}{hint}") from None


def first_tensor(output, role: str, path: str) -> torch.Tensor:
    """The tensor a tapped module returned (the first tensor of a tuple / list)."""
    if isinstance(output, torch.Tensor):
        return output
    if isinstance(output, (tuple, list)):
        for o in output:
            if isinstance(o, torch.Tensor):
                return o
    raise TapError(f"tap {role!r}: module {path!r} returned {type(output).__name__}, not a tensor")


class _Stop(Exception):
    """Raised by a hook to end the forward pass once the tap it waits for has returned."""


def meta_copy(net: nn.Module) -> nn.Module:
    """A copy of `net` whose parameters and buffers are empty ``meta`` tensors (shared tensors stay shared)."""
    memo = {}
    for t in list(net.parameters()) + list(net.buffers()):
        if id(t) not in memo:
            m = torch.empty_like(t, device="meta")
            memo[id(t)] = nn.Parameter(m, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else m
    return copy.deepcopy(net, memo)


class TapSet:
    """Forward hooks on the tapped modules of `net` (see the module docstring).

    Raises TapError (one line) for a path that names no module.
    """

    def __init__(self, net: nn.Module, taps: Union[Taps, Mapping]):
        self.net, self.taps = net, Taps.from_any(taps)
        self.paths = self.taps.roles()
        modules = {role: resolve_module(net, path, role) for role, path in self.paths.items()}
        self._meta = meta_copy(net)  # before our hooks exist, so the copy carries none of them
        self._store: Dict[str, torch.Tensor] = {}
        self._order: List[str] = []
        self._stop_at: Optional[str] = None
        self._handles = []
        by_module: Dict[int, Tuple[nn.Module, List[str]]] = {}
        for role, mod in modules.items():
            by_module.setdefault(id(mod), (mod, []))[1].append(role)
        for mod, roles in by_module.values():
            self._handles.append(mod.register_forward_hook(self._hook(tuple(roles))))

    @property
    def name(self) -> str:
        return type(self.net).__name__

    def _hook(self, roles: Tuple[str, ...]):
        def hook(module, inputs, output):
            if self._stop_at is None:  # the user's own forward passes: nothing recorded, nothing kept
                return None
            for role in roles:
                if role not in self._store:  # a module called twice: its first output
                    self._store[role] = first_tensor(output, role, self.paths[role])
                    self._order.append(role)
            if self._stop_at in roles:
                raise _Stop()
            return None
        return hook

    def _call(self, module: nn.Module, x: torch.Tensor, stop_at: str, store: Dict, order: List) -> Dict[str, torch.Tensor]:
        if stop_at not in self.paths:
            raise TapError(f"no {stop_at!r} tap set on {self.name} (taps: {self.paths})")
        self._store, self._order, self._stop_at = store, order, stop_at
        try:
            module(x)
        except _Stop:
            pass
        finally:
            self._stop_at, self._store, self._order = None, {}, []  # keep no activation after the pass
        if stop_at not in store:
            raise TapError(f"tap {stop_at!r}: module {self.paths[stop_at]!r} did not run in {self.name}.forward")
        return store

    def run(self, x: torch.Tensor, stop_at: str) -> Dict[str, torch.Tensor]:
        """Run the network on x until the module of `stop_at` returns: {role: feature} of every tap that ran."""
        return self._call(self.net, x, stop_at, {}, [])

    def probe(self, shape: Sequence[int], stop_at: str) -> Tuple[Dict[str, Tuple[int, ...]], List[str], set]:
        """Shapes without compute: ({role: output shape}, roles in the order they returned, names of every module
        of the network that ran) for an input of `shape` (B, C, *S), on the meta copy. The mode (train/eval) is
        the real network's. Raises TapError when a network layer rejects the input (message kept)."""
        meta = self._meta
        meta.train(self.net.training)
        ran: set = set()
        names: Dict[int, List[str]] = {}
        for n, m in meta.named_modules(remove_duplicate=False):
            names.setdefault(id(m), []).append(n)
        mods = {id(m): m for m in meta.modules()}
        handles = [m.register_forward_hook(lambda mod, i, o, k=k: ran.update(names[k])) for k, m in mods.items()]
        roles = {role: meta.get_submodule(p) for role, p in self.paths.items()}
        store: Dict[str, torch.Tensor] = {}
        order: List[str] = []
        by_module: Dict[int, Tuple[nn.Module, List[str]]] = {}
        for role, mod in roles.items():
            by_module.setdefault(id(mod), (mod, []))[1].append(role)
        handles += [mod.register_forward_hook(self._hook(tuple(rs))) for mod, rs in by_module.values()]
        try:
            self._call(meta, torch.empty(tuple(shape), device="meta"), stop_at, store, order)
        except TapError:
            raise
        except Exception as e:  # a layer that cannot take this size (pooling a 1x1 map, a norm over 1 element)
            size = "x".join(str(s) for s in shape[2:])
            msg = " ".join(str(e).split())[:200]
            raise TapError(f"{self.name} cannot take a {size} input up to its {stop_at!r} tap: {msg}") from None
        finally:
            for h in handles:
                h.remove()
        return {r: tuple(t.shape) for r, t in store.items()}, order, ran

    def remove(self) -> None:
        """Remove the hooks from the user's network (they are inert outside `run` / `probe` anyway)."""
        for h in self._handles:
            h.remove()
        self._handles = []


def infer_dims_channels(net: nn.Module) -> Tuple[int, int]:
    """(spatial dims, input channels) of the first Conv2d / Conv3d of `net`. TapError when there is none."""
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Conv3d)):
            return (2 if isinstance(m, nn.Conv2d) else 3), int(m.in_channels)
    raise TapError(f"{type(net).__name__} has no Conv2d / Conv3d: pass dims= and in_channels= to macl.nets.adapt")


__all__ = ["Taps", "TapSet", "TapError", "resolve_module", "meta_copy", "infer_dims_channels", "ROLES"]
