"""The batch-1 decode step built ahead of time with AOTInductor (torch.export, then inductor's C++ kernels AND its C++
wrapper in one shared library), and the on-disk cache of built libraries.

Why, on CPU: the same kernels called through torch.compile pay its Python on every call (dynamo's frame and guards,
the runtime wrappers, ~40 kernel calls and ~70 buffer allocations from Python); one library call does not, with the
same logits bit for bit (figures: README, "Compiled decode step"). Only where the batch-1 graph uses inductor's own
C++ GEMVs (`steps.autotune_batch1`): with oneDNN's kernels the exported graph ran slower, which is also why batch >= 2
stays compiled. A built library is kept in `aot_cache_dir()` under a key of everything it depends on (`aot_key`),
so the next engine over the same weights and code loads it instead of rebuilding.
"""

from __future__ import annotations

import hashlib
import os
import platform
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Callable

import torch

import picochat
from picochat.common import _cpu_flags, get_base_dir
from picochat.engine.steps import decode_step_body, with_weights

AOT_CACHE_KEEP = 4

# the source files whose code becomes the exported graph: an edit to any of them must not load an old library
GRAPH_SOURCES = ("model.py", "attention.py", "engine/cache.py", "engine/sampling.py", "engine/steps.py",
                 "engine/aot.py")


class _StepModule(torch.nn.Module):
    """`decode_step_body` as a module (torch.export takes modules, not functions), reading `weights` in place of the
    model's own (see `steps.with_weights`), each layer's cache row given as (S, Hkv, D)."""

    def __init__(self, model, device_type: str, dtype: torch.dtype, weights: dict):
        super().__init__()
        self.model, self.device_type, self.dtype, self.weights = model, device_type, dtype, weights

    def forward(self, tokens, pos, ks, vs, temperature, u):
        ks, vs = [k[None] for k in ks], [v[None] for v in vs]  # (S, Hkv, D) -> (1, S, Hkv, D), views
        model = with_weights(self.model, self.weights)
        return decode_step_body(model, tokens, pos, ks, vs, self.device_type, self.dtype, temperature, u)


def build_batch1(model, dtype: torch.dtype, weights: dict, context: int, options: dict, example: tuple) -> Callable:
    """The batch-1 step as a library call: run(tokens (1, 1), pos (1,), ks, vs, temperature (1,), u (1,)) ->
    (logits, sampled), ks/vs per layer (1, S, Hkv, D). `example`: those inputs (their values only shape the export);
    the kv length S is the one dynamic dimension. bf16 needs `weights`, the linear weights already cast: exported
    under autocast, the casts of the fp32 weights stayed in the graph, one per weight per step. The library takes
    each layer's cache row as (S, Hkv, D): with the batch dimension, exporting a bf16 step specialised on
    S * row size < the cache's row stride (a layout check in a dtype conversion), i.e. on S < the context."""
    x, pos, ks, vs, temperature, u = example
    folder = aot_cache_dir()
    path = folder / f"decode_batch1-{aot_key(model, context, dtype, options)}.pt2" if folder else None
    if path is not None and path.exists():
        try:
            return _runner(path)
        except Exception as exc:  # a truncated or foreign file: say so, drop it, build anew
            print(f"picochat: ignoring unreadable AOT cache entry {path.name} ({type(exc).__name__}); rebuilding",
                  file=sys.stderr)
            path.unlink(missing_ok=True)
    S = torch.export.Dim("S", min=2, max=context)
    with torch.inference_mode(False), torch.no_grad(), tempfile.TemporaryDirectory(prefix="picochat-aot-") as tmp:
        example = (x.clone(), pos.clone(), [k[0].clone() for k in ks], [v[0].clone() for v in vs],
                   temperature.clone(), u.clone())
        dims = (None, None, [{0: S}] * len(ks), [{0: S}] * len(vs), None, None)
        module = _StepModule(model, x.device.type, dtype, weights)
        program = torch.export.export(module, example, dynamic_shapes=dims)
        built = torch._inductor.aoti_compile_and_package(program, package_path=f"{tmp}/step.pt2",
                                                         inductor_configs=options)
        if path is None:
            return _runner(Path(built))
        try:
            folder.mkdir(parents=True, exist_ok=True)
            part = path.with_suffix(f".part{os.getpid()}")
            shutil.copyfile(built, part)
            os.replace(part, path)  # atomic: another process sees the whole file or none
        except OSError as exc:  # a read-only or full cache folder costs the next start a rebuild, nothing more
            print(f"picochat: could not keep the built decode step in {folder} ({exc.strerror or exc}); set "
                  f"PICOCHAT_AOT_CACHE to a writable folder, or to off", file=sys.stderr)
            return _runner(Path(built))
    for old in sorted(folder.glob("decode_batch1-*.pt2"), key=lambda f: f.stat().st_mtime)[:-AOT_CACHE_KEEP]:
        old.unlink(missing_ok=True)  # keep the newest few: each holds a copy of its model's weights
    return _runner(path)


def aot_cache_dir() -> Path | None:
    """Where built decode libraries are kept: $PICOCHAT_AOT_CACHE ("off": nowhere, build every time), else
    <base dir>/aot."""
    env = os.environ.get("PICOCHAT_AOT_CACHE", "")
    if env.lower() == "off":
        return None
    return Path(env) if env else get_base_dir() / "aot"


def source_hash() -> str:
    """A hash of the package version and the code that feeds the exported graph (`GRAPH_SOURCES`)."""
    root = Path(picochat.__file__).parent
    h = hashlib.sha256(picochat.__version__.encode())
    for name in GRAPH_SOURCES:
        h.update(name.encode())
        h.update((root / name).read_bytes())
    return h.hexdigest()


def aot_key(model, context: int, dtype: torch.dtype, options: dict) -> str:
    """A hash of what the library depends on: the code (`source_hash`), every weight's bytes, the dtype (the cast
    copies follow from the two), the model's config, the inductor options, torch's version, the CPU (its kernels use
    its instruction set) and the thread count (the autotuner timed its kernel choices at it)."""
    h = hashlib.sha256()
    for value in (source_hash(), torch.__version__, platform.machine(), sorted(_cpu_flags()),
                  torch.get_num_threads(), context, str(dtype), sorted(options.items()), repr(model.config)):
        h.update(repr(value).encode())
    for name, t in model.state_dict().items():
        h.update(name.encode())
        h.update(t.detach().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:20]


def _runner(path: Path) -> Callable:
    # the package's own __call__ re-parses its input/output tree specs from JSON and walks them at every call (~6% of
    # a depth-6 step); the loader takes the flat list, in the tree's order, and returns [logits, sampled]
    run = torch._inductor.aoti_load_package(str(path)).loader.boxed_run

    def step(tokens, pos, ks, vs, temperature, u):
        # boxed: the call empties the list it is given; k[0]: the row of the (1, S, Hkv, D) slice
        logits, sampled = run([tokens, pos, *(k[0] for k in ks), *(v[0] for v in vs), temperature, u])
        return logits, sampled
    return step
