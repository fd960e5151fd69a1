"""Load a teacher where ``placement.Replica`` puts it, within a memory budget, and prove the split exact.

- ``plan_placement``: the teacher's weight sizes from its config alone (an empty model on the
  meta device), the memory this replica may use (``--max-memory``, else what is free), and the
  device map Accelerate infers from them: layers balanced over the replica's GPUs, then host
  memory, then disk. ``None`` when the whole teacher fits the process' one device: then it loads
  as it always has.
- ``load_placed``: the teacher on that map (``from_pretrained(device_map=...)``; safetensors
  checkpoints are streamed from their own files, others are written to ``--offload-dir`` first),
  or tensor-parallel over the replica's processes.
- ``check_split``: the split model's log-probs on a probe against the teacher's own single-device
  forward, run with every layer streamed from the checkpoint through one device (no second copy
  in memory). A split that differs is refused.
"""

from __future__ import annotations

import os
import resource
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch

from kdcache.pipeline.cache.placement import (
    MemoryBudget,
    Replica,
    format_size,
    parse_max_memory,
)
from kdcache.pipeline.errors import UserError
from kdcache.pipeline.teacher import TeacherSource, load_model

HOST_SHARE = 0.9  # of the free host memory, split among the node's replicas, when not given
DEVICE_SHARE = 0.9  # of a GPU's free memory when --max-memory is not given
_OFFLOAD_DIRS: list[tempfile.TemporaryDirectory[str]] = []  # live as long as the process


@dataclass(frozen=True)
class Placement:
    """Where the teacher's weights go.

    Attributes:
        device_map: module name -> GPU index, "cpu" or "disk"; None: all on the one device.
        weights_bytes: the teacher's weights in the run's dtype.
        largest_layer: (name, bytes) of the largest module that is never split.
        budget: the max_memory given to Accelerate (device -> bytes).
    """

    device_map: dict[str, Any] | None
    weights_bytes: int
    largest_layer: tuple[str, int]
    budget: dict[Any, int]

    @property
    def offloaded(self) -> dict[str, int]:
        """Modules per offload target ("cpu", "disk") in the device map."""
        places = list((self.device_map or {}).values())
        return {where: places.count(where) for where in ("cpu", "disk") if where in places}

    def describe(self) -> str:
        """One line: where the teacher's modules went, and why."""
        device_map = self.device_map or {}
        places = list(device_map.values())
        if list(device_map) == [""]:  # one entry: the whole model
            where = f"the whole teacher {_place(places[0])}"
        else:
            where = ", ".join(
                f"{places.count(p)} module{'s' * (places.count(p) > 1)} {_place(p)}"
                for p in dict.fromkeys(places)
            )
        budget = ", ".join(
            f"{'host' if d == 'cpu' else f'GPU {d}'} {format_size(b)}"
            for d, b in self.budget.items()
        )
        stream = ", offloaded layers stream through the device on every forward"
        return (
            f"teacher placed by module ({where}): its weights take "
            f"{format_size(self.weights_bytes)}, the budget is {budget} (--max-memory)"
            + (stream if self.offloaded else "")
        )


def _place(where: Any) -> str:
    names = {"cpu": "in host memory", "disk": "on disk"}
    return f"on GPU {where}" if isinstance(where, int) else names.get(str(where), str(where))


def _empty_model(source: TeacherSource, dtype: torch.dtype, trust_remote_code: bool) -> Any:
    """The teacher's modules on the meta device: sizes without memory."""
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(
            source.config, dtype=dtype, trust_remote_code=trust_remote_code
        )
    model.tie_weights()
    return model


def _free_host_bytes() -> int:
    import psutil

    local = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    return int(psutil.virtual_memory().available * HOST_SHARE / max(local, 1))


def plan_placement(
    source: TeacherSource,
    dtype: torch.dtype,
    replica: Replica,
    budget: MemoryBudget,
    *,
    trust_remote_code: bool,
) -> Placement:
    """The device map of this replica's teacher (``None`` when it fits its one device whole).

    Raises:
        UserError: a device budget below the largest layer (it must pass through a device).
    """
    from accelerate.utils import (
        compute_module_sizes,
        get_balanced_memory,
        get_max_layer_size,
        infer_auto_device_map,
    )

    model = _empty_model(source, dtype, trust_remote_code)
    sizes = compute_module_sizes(model, dtype=dtype)
    no_split = list(getattr(model, "_no_split_modules", None) or [])
    largest, names = get_max_layer_size(list(model.named_children()), sizes, no_split)
    total = int(sizes[""])
    host = budget.host if budget.host is not None else _free_host_bytes()
    if replica.device_indices:
        per_device = {
            i: budget.device
            if budget.device is not None
            else int(torch.cuda.mem_get_info(i)[0] * DEVICE_SHARE)
            for i in replica.device_indices
        }
        max_memory: dict[Any, int] = {**per_device, "cpu": host}
        smallest = min(per_device.values())
        what = "one GPU's --max-memory" if budget.device is not None else "a GPU's free memory"
    else:
        max_memory = {"cpu": budget.device if budget.device is not None else host}
        smallest = max_memory["cpu"]
        what = "--max-memory" if budget.given else "the free host memory"
    layer = (names[0] if names else "", int(largest))
    if smallest < largest and (budget.given or total > smallest):
        raise UserError(
            f"{what} of {format_size(smallest)} is below the teacher's largest layer, "
            f"{layer[0]} ({format_size(largest)} in {str(dtype).removeprefix('torch.')}), "
            f"which must pass through the device whole, give at least {format_size(largest)}"
        )
    if replica.size == 1 and total <= smallest:
        return Placement(None, total, layer, max_memory)
    if len(replica.device_indices) > 1:
        max_memory = get_balanced_memory(
            model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
        )
    device_map = infer_auto_device_map(
        model, max_memory=max_memory, no_split_module_classes=no_split, dtype=dtype
    )
    return Placement(dict(device_map), total, layer, max_memory)


def _safetensors(source: TeacherSource) -> bool:
    return source.local_dir is not None and any(source.local_dir.glob("*.safetensors"))


def _offload_folder(source: TeacherSource, offload_dir: Path | None, needed: bool) -> str | None:
    """A private folder under ``offload_dir`` for weights Accelerate must write out (checkpoints
    that are not safetensors), removed when the process ends."""
    if not needed or _safetensors(source):
        return None
    if offload_dir is None:
        raise UserError(
            f"the teacher's weights ({source.name_or_path}) do not fit the memory given and its "
            "checkpoint is not in safetensors, which is read in place, pass --offload-dir DIR "
            "for the layers that go to disk"
        )
    folder = tempfile.TemporaryDirectory(prefix=f"kdcache-offload-{os.getpid()}-", dir=offload_dir)
    _OFFLOAD_DIRS.append(folder)
    return folder.name


def load_placed(
    source: TeacherSource,
    dtype: torch.dtype,
    device: torch.device,
    replica: Replica,
    placement: Placement | None,
    offload_dir: Path | None,
    *,
    trust_remote_code: bool,
) -> Any:
    """The teacher in ``eval()`` mode, gradients off, placed as ``placement`` says."""
    if replica.split == "tensor" and replica.size > 1:
        from transformers.distributed import DistributedConfig

        # transformers lays its mesh out as (replicas, tensor), tensor innermost: the groups of
        # consecutive ranks that replica_of forms; a replica dimension of 1 is left out
        config = DistributedConfig(
            tp_plan="auto",
            tp_size=replica.size,
            dp_replicate_size=replica.count if replica.count > 1 else None,
        )
        return load_model(
            source, dtype, None, trust_remote_code=trust_remote_code, distributed_config=config
        )
    if placement is None or placement.device_map is None:
        return load_model(source, dtype, device, trust_remote_code=trust_remote_code)
    folder = _offload_folder(source, offload_dir, "disk" in placement.offloaded)
    return load_model(
        source,
        dtype,
        None,
        trust_remote_code=trust_remote_code,
        device_map=placement.device_map,
        offload_folder=folder,
    )


def _set_execution_device(model: Any, device: torch.device) -> None:
    """Every Accelerate hook of ``model`` computes on ``device``."""
    for module in model.modules():
        hook = getattr(module, "_hf_hook", None)
        for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):
            if hasattr(h, "execution_device"):
                h.execution_device = device


def reference_logits(
    source: TeacherSource,
    dtype: torch.dtype,
    probe: torch.Tensor,
    device: torch.device,
    offload_dir: Path | None,
    *,
    trust_remote_code: bool,
) -> torch.Tensor:
    """The teacher's own forward on ``probe`` (1, P) with every layer on ``device`` in turn,
    streamed from the checkpoint: (P, V) float32 logits."""
    with tempfile.TemporaryDirectory(prefix="kdcache-reference-", dir=offload_dir) as folder:
        reference = load_model(
            source,
            dtype,
            None,
            trust_remote_code=trust_remote_code,
            device_map={"": "disk"},
            offload_folder=folder,
        )
        if device.type != "cpu":  # its hooks compute on the CPU unless told otherwise
            _set_execution_device(reference, device)
        with torch.no_grad():  # not inference_mode: Accelerate re-wraps offloaded weights
            logits = reference(input_ids=probe.to(device), use_cache=False).logits[0].float()
        del reference
    return logits


def check_split(
    model: Any,
    source: TeacherSource,
    dtype: torch.dtype,
    probe: torch.Tensor,
    device: torch.device,
    offload_dir: Path | None,
    *,
    trust_remote_code: bool,
    what: str,
) -> str | None:
    """None when the split model's log-probs on ``probe`` (1, P) match the single-device
    forward's (within float rounding of ``dtype``); else one line saying why it is refused."""
    try:
        with torch.inference_mode():
            got = model(input_ids=probe, use_cache=False).logits[0].float().to(device)
    except Exception as e:  # a split the platform cannot run (e.g. heads not divisible)
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        return f"the {what} of {source.name_or_path} fails on this platform ({reason})"
    want = reference_logits(
        source, dtype, probe, device, offload_dir, trust_remote_code=trust_remote_code
    )
    tolerance = 1e-3 + 4 * torch.finfo(dtype).eps * float(want.abs().max())
    error = float((got.log_softmax(-1) - want.log_softmax(-1)).abs().max())
    if error > tolerance or error != error:  # NaN: not exact either
        return (
            f"the {what} of {source.name_or_path} differs from its single-device forward by "
            f"{error:.3g} in log-prob (tolerance {tolerance:.3g})"
        )
    return None


def peak_memory(replica: Replica) -> tuple[int, int]:
    """(peak host bytes of this process, peak bytes it allocated on any GPU of its replica)."""
    host = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    if not torch.cuda.is_available():
        return int(host), 0
    mine = replica.device_indices if replica.split == "pipeline" else ()
    indices = mine if replica.leader and mine else (torch.cuda.current_device(),)
    return int(host), max(int(torch.cuda.max_memory_allocated(i)) for i in indices)


def load_teacher(
    accelerator: Any,
    s: Any,
    source: TeacherSource,
    dtype: torch.dtype,
    replica: Replica,
    probe: list[int],
) -> Any:
    """This process' part of its teacher replica, checked: ``TeacherTargets``, or None for a
    process that only lends its device to its leader. A failure on any rank is refused on all
    of them, with one line from rank 0, before anything is written.

    Args:
        s: the run's ``CacheSettings``.
        probe: token ids of the self-check's probe.
    """
    from accelerate.utils import gather_object

    from kdcache.pipeline.cache.targets import TeacherTargets
    from kdcache.pipeline.host_memory import keep_freed_memory

    device, targets, failure, notes = accelerator.device, None, None, []
    # --offload-dir was made and proven writable with the settings (settings.check_placement)
    offload_dir = Path(s.offload_dir).expanduser() if s.offload_dir is not None else None
    trust = s.trust_remote_code
    if replica.computes:
        try:
            placement = None
            if replica.split == "pipeline":
                budget = parse_max_memory(s.max_memory)
                placement = plan_placement(source, dtype, replica, budget, trust_remote_code=trust)
                if placement.device_map is not None:
                    notes.append(placement.describe())
            model = load_placed(
                source, dtype, device, replica, placement, offload_dir, trust_remote_code=trust
            )
            probe_ids = torch.tensor([probe], device=device)
            if replica.spans_devices:
                what = f"{replica.split} split over {replica.size} devices"
                refused = check_split(
                    model,
                    source,
                    dtype,
                    probe_ids,
                    device,
                    offload_dir,
                    trust_remote_code=trust,
                    what=what,
                )
                if refused:
                    other = "--split pipeline" if replica.split == "tensor" else "fewer devices"
                    failure = f"{refused}; refused, nothing written, use {other}"
            if failure is None:
                keep_freed_memory(device, large_blocks=False)  # CPU: no page faults per activation
                real_vocab = source.tokenizer_size
                targets = TeacherTargets(
                    model,
                    s.stored_top_k,
                    s.stored_samples,
                    s.sample_seed,
                    chunk_tokens=s.chunk_tokens,
                    sample_temperature=s.sample_temperature,
                    real_vocab=real_vocab if real_vocab < source.vocab_size else None,
                )
                notes.append(targets.self_check(probe_ids))
        except UserError as e:
            failure = str(e)
    failures = gather_object([failure]) if accelerator.num_processes > 1 else [failure]
    refused = next((f for f in failures if f), None)
    if refused is not None:
        if not accelerator.is_main_process:
            raise SystemExit(2)  # rank 0 prints the one error line
        raise UserError(refused)
    if accelerator.is_main_process:
        for note in filter(None, notes):
            click.echo(f"Note: {note}", err=True)
    return targets


def memory_facts(accelerator: Any, replica: Any, s: Any) -> dict[str, Any]:
    """Peak host memory of any process and peak memory allocated on any GPU, in bytes, and how
    the teacher was placed (summary facts)."""
    peaks = torch.tensor(peak_memory(replica), dtype=torch.int64, device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(peaks, op=torch.distributed.ReduceOp.MAX)
    host, device = (int(x) for x in peaks.tolist())
    return {
        "peak_host_bytes": host,
        "peak_device_bytes": device if accelerator.device.type == "cuda" else None,
        "devices_per_teacher": s.devices_per_teacher,
        "split": s.split,
    }
